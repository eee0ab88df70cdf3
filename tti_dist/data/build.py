"""Build a token dataset from a text source: read, split by document, tokenize, write shards.

The split is by document and deterministic: document i (named `name`) goes to val iff
`int(sha256(f"{i}:{name}")[:8 bytes]) / 2**64 < val_fraction`. A source too small for any
document to land in val puts its last document there. A BPE tokenizer is trained on the train
split only, so val text never shapes the vocabulary. The manifest records the build
parameters next to the source description, so a dataset says how to rebuild it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from tti_dist.data.arrow_dataset import DEFAULT_SHARD_TOKENS, check_out_dir, write_dataset
from tti_dist.data.sources import Document, read_source
from tti_dist.data.tokenizer import (
    BYTE_VOCAB_SIZE,
    ByteTokenizer,
    Tokenizer,
    check_bpe_vocab_size,
    train_bpe,
)
from tti_dist.errors import ConfigError

logger = logging.getLogger(__name__)

TOKENIZERS = ("byte", "bpe")
_ENCODE_BATCH_DOCS = 1024


def val_score(index: int, name: str) -> float:
    """Stable pseudo-random number in [0, 1) for document `index` named `name`."""
    key = f"{index}:{name}".encode("utf-8", errors="surrogateescape")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val) documents, each in source order; see the module docstring."""
    is_val = [val_score(i, d.name) < val_fraction for i, d in enumerate(docs)]
    if docs and not any(is_val):
        is_val[-1] = True
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


def _pack(tok: Tokenizer, docs: list[Document]) -> np.ndarray:
    """Each document's ids followed by EOS, concatenated (uint32)."""
    encode_batch = getattr(tok, "encode_batch", None)
    pieces: list[np.ndarray] = []
    for start in range(0, len(docs), _ENCODE_BATCH_DOCS):
        texts = [d.text for d in docs[start:start + _ENCODE_BATCH_DOCS]]
        pieces.extend(encode_batch(texts) if encode_batch else [tok.encode(t) for t in texts])
    out = np.empty(sum(len(p) for p in pieces) + len(pieces), dtype=np.uint32)
    pos = 0
    for ids in pieces:
        out[pos:pos + len(ids)] = ids
        pos += len(ids)
        out[pos] = tok.eos_id
        pos += 1
    return out


def _validate(tokenizer, vocab_size, val_fraction, shard_tokens) -> None:
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"--tokenizer: {tokenizer!r} is not allowed; use one of {', '.join(TOKENIZERS)}")
    if tokenizer == "byte":
        if vocab_size is not None and vocab_size != BYTE_VOCAB_SIZE:
            raise ConfigError(
                f"--vocab-size: {vocab_size!r} is not allowed with --tokenizer byte, whose vocabulary "
                f"is fixed at {BYTE_VOCAB_SIZE}; omit it or use --tokenizer bpe"
            )
    elif vocab_size is None:
        raise ConfigError("--vocab-size: required with --tokenizer bpe (e.g. 8192)")
    else:
        check_bpe_vocab_size(vocab_size)
    if (isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float))
            or not 0.0 < val_fraction < 1.0):
        raise ConfigError(f"--val-fraction: {val_fraction!r} is not allowed; use a number in (0, 1)")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ConfigError(f"--shard-tokens: {shard_tokens!r} is not allowed; use a positive number of tokens")


def build_dataset(
    source: str,
    out_dir: str | Path,
    *,
    tokenizer: str = "byte",
    vocab_size: int | None = None,
    val_fraction: float = 0.01,
    text_field: str = "text",
    max_bytes: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
) -> dict:
    """Build a dataset at `out_dir` from `source` (see `sources.iter_documents`); return its manifest.

    Args:
        source: "stdlib", or a path to a text file, directory, *.jsonl, *.parquet or *.arrow.
        out_dir: dataset directory to create (atomically).
        tokenizer: "byte" (fixed 257-token vocabulary) or "bpe" (trained on the train split).
        vocab_size: BPE vocabulary size (required for "bpe"; must be omitted or 257 for "byte").
        val_fraction: expected fraction of documents held out for validation, in (0, 1).
        text_field: the text field/column of JSONL/Parquet/Arrow records.
        max_bytes: read at most this many bytes of text; None reads everything.
        shard_tokens: the most tokens per shard file.
        overwrite: replace an existing dataset at `out_dir`.

    Raises:
        ConfigError: a bad argument (naming its flag), an unusable source, `out_dir` not
            writable, or no document left for training.
    """
    _validate(tokenizer, vocab_size, val_fraction, shard_tokens)
    check_out_dir(out_dir, overwrite)  # fail before the expensive part
    docs, source_desc = read_source(source, text_field=text_field, max_bytes=max_bytes)
    train, val = split_documents(docs, val_fraction)
    if not train:
        raise ConfigError(
            f"--val-fraction: {val_fraction!r} leaves no document for training "
            f"(data.source {source!r} has {len(docs)} document{'s' if len(docs) != 1 else ''}); "
            "use a smaller fraction or a source with more documents"
        )
    tok: Tokenizer
    if tokenizer == "byte":
        tok = ByteTokenizer()
    else:
        num_invalid = 0
        for d in docs:
            try:
                d.text.decode("utf-8")
            except UnicodeDecodeError:
                num_invalid += 1
        if num_invalid:
            logger.warning(
                "data.source=%r: %d of %d documents are not valid UTF-8; the BPE tokenizer sees "
                "their invalid bytes as U+FFFD, so they do not round-trip exactly",
                source, num_invalid, len(docs),
            )
        tok = train_bpe((d.text for d in train), vocab_size)
    splits = {"train": {"tokens": _pack(tok, train)}, "val": {"tokens": _pack(tok, val)}}
    build = {
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "val_fraction": val_fraction,
        "text_field": text_field,
        "max_bytes": max_bytes,
        "shard_tokens": shard_tokens,
    }
    return write_dataset(
        out_dir,
        splits=splits,
        tokenizer=tok,
        source=source_desc,
        num_documents={"train": len(train), "val": len(val)},
        shard_tokens=shard_tokens,
        build=build,
        overwrite=overwrite,
    )
