"""Helpers shared by the unit, integration and distributed tests."""

from __future__ import annotations

from pathlib import Path

import pytest


def save_tokenizer_json(path: Path, special_tokens: list[str], texts: list[str] | None = None,
                        vocab_size: int = 420) -> Path:
    """A small byte-level BPE trained and saved with HuggingFace `tokenizers` itself, as a
    user's tokenizer.json is (GPT-2's layout: ByteLevel pre-tokenizer and decoder)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts or [f"line {i} of some text" for i in range(200)], trainer=trainer)
    hf.save(str(path))
    return path


@pytest.fixture
def tokenizer_json():
    """save_tokenizer_json(path, special_tokens, texts=None, vocab_size=420) -> path."""
    return save_tokenizer_json
