"""Tokenize batches of documents into packed token arrays, in this process or in workers.

`encode_documents` is the one function that turns documents into tokens for
`build_dataset`, whether it runs in the building process (`--workers 1`) or in a worker of a
`multiprocessing` pool (`--workers N`): the same function on the same batch gives the same
arrays, so the dataset does not depend on the number of workers.

Workers are started with the "spawn" method. Forking would copy a process that may already
run the tokenizers library's thread pool (BPE training starts it), which can deadlock a
child; spawned workers import only this module and its small dependencies (numpy,
tokenizers), not pyarrow or torch. Each worker's tokenizer runs single-threaded
(TOKENIZERS_PARALLELISM=false), so N workers use about N cores.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from tti_dist.data.tokenizer import BPETokenizer, ByteTokenizer, PretrainedTokenizer, Tokenizer

_ENCODE_CALL_BYTES = 256 * 1024
"""Text per call of the tokenizers batch encoder. Its temporary memory is about 100 bytes per
byte of text (per-byte alignments, token strings, offsets), so this bounds it to ~25 MB."""


@dataclass(frozen=True)
class EncodedSplit:
    """The documents of one split of a batch, in order: ids packed with EOS after each."""

    tokens: np.ndarray
    """Packed ids in the dataset's token dtype."""
    doc_lengths: np.ndarray
    """Tokens of each document including its EOS (int64); they sum to len(tokens)."""


@dataclass(frozen=True)
class EncodedBatch:
    """What tokenizing a batch yields: per split its packed tokens, and a UTF-8 count."""

    splits: dict[str, EncodedSplit]
    """"train" and "val" (either may hold no document)."""
    num_invalid_utf8: int
    """Documents of the batch that are not valid UTF-8 (subword tokenizers see U+FFFD)."""
    pid: int
    """The process that tokenized it."""


def _texts(tok: Tokenizer, texts: Sequence[bytes]) -> tuple[list, int]:
    """What the tokenizer encodes: bytes for the byte tokenizer, else str, and how many
    texts needed U+FFFD replacement."""
    if isinstance(tok, ByteTokenizer):
        return list(texts), 0
    out: list[str] = []
    num_invalid = 0
    for text in texts:
        try:
            out.append(text.decode("utf-8"))
        except UnicodeDecodeError:
            num_invalid += 1
            out.append(text.decode("utf-8", errors="replace"))  # what BPETokenizer.encode does
    return out, num_invalid


def _encode_many(tok: Tokenizer, texts: list) -> list[np.ndarray]:
    if isinstance(tok, ByteTokenizer):
        return [np.frombuffer(t, dtype=np.uint8) for t in texts]
    if isinstance(tok, BPETokenizer):
        out: list[np.ndarray] = []
        start = 0
        while start < len(texts):
            end, size = start, 0
            while end < len(texts) and (end == start or size + len(texts[end]) <= _ENCODE_CALL_BYTES):
                size += len(texts[end])
                end += 1
            encodings = tok.hf_tokenizer.encode_batch_fast(texts[start:end], add_special_tokens=False)
            out.extend(np.asarray(e.ids, dtype=np.uint32) for e in encodings)
            del encodings  # before the next call allocates its own
            start = end
        return out
    return [tok.encode(t.encode("utf-8") if isinstance(t, str) else t) for t in texts]


def _pack(pieces: list[np.ndarray], eos_id: int, dtype: np.dtype) -> EncodedSplit:
    lengths = np.fromiter((len(p) + 1 for p in pieces), dtype=np.int64, count=len(pieces))
    out = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for ids in pieces:
        out[pos:pos + len(ids)] = ids
        pos += len(ids)
        out[pos] = eos_id
        pos += 1
    return EncodedSplit(out, lengths)


def encode_documents(tok: Tokenizer, dtype: np.dtype, texts: Sequence[bytes],
                     is_val: Sequence[bool]) -> EncodedBatch:
    """Tokenize `texts` (raw UTF-8 bytes, in source order) and pack each split's documents,
    in order, each followed by `tok.eos_id`, as `dtype` ids."""
    strings, num_invalid = _texts(tok, texts)
    ids = _encode_many(tok, strings)
    splits = {}
    for split, want_val in (("train", False), ("val", True)):
        splits[split] = _pack([a for a, v in zip(ids, is_val) if v == want_val], tok.eos_id, np.dtype(dtype))
    return EncodedBatch(splits, num_invalid, os.getpid())


_libc_malloc_trim = None


def release_free_memory() -> None:
    """Return freed heap memory to the operating system (glibc `malloc_trim`; elsewhere a no-op).

    The tokenizers library allocates its temporaries (~100 bytes per byte of text) on rayon
    threads, each with its own malloc arena; freed, they stay resident in those arenas, and
    which arenas hold how much drifts from batch to batch, so without trimming the resident
    size creeps up with the number of batches, i.e. with the corpus.
    """
    global _libc_malloc_trim
    if _libc_malloc_trim is None:
        try:
            _libc_malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _libc_malloc_trim = False
    if _libc_malloc_trim:
        _libc_malloc_trim(0)


# ---------------------------------------------------------------- pool workers

_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def tokenizer_spec(tok: Tokenizer) -> tuple:
    """A picklable description from which `tokenizer_from_spec` rebuilds `tok` in a worker."""
    if isinstance(tok, ByteTokenizer):
        return ("byte",)
    if isinstance(tok, PretrainedTokenizer):
        return ("pretrained", tok.to_bytes(), tok.eos_token)
    if isinstance(tok, BPETokenizer):
        return ("bpe", tok.to_bytes(), tok.eos_token)
    raise TypeError(f"cannot ship a {type(tok).__name__} to a tokenizing worker")


def tokenizer_from_spec(spec: tuple) -> Tokenizer:
    if spec[0] == "byte":
        return ByteTokenizer()
    if spec[0] == "pretrained":
        return PretrainedTokenizer(spec[1], spec[2])
    return BPETokenizer(HFTokenizer.from_str(spec[1].decode("utf-8")), spec[2])


def init_worker(spec: tuple, dtype: str) -> None:
    """Pool initializer: build the tokenizer once per worker process."""
    global _worker_tokenizer, _worker_dtype
    # Read by the tokenizers library at each batch call: one thread per worker process.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer_from_spec(spec)
    _worker_dtype = np.dtype(dtype)


def encode_in_worker(texts: list[bytes], is_val: list[bool]) -> EncodedBatch:
    """Pool task: `encode_documents` with the worker's tokenizer."""
    assert _worker_tokenizer is not None and _worker_dtype is not None, "init_worker did not run"
    batch = encode_documents(_worker_tokenizer, _worker_dtype, texts, is_val)
    if not isinstance(_worker_tokenizer, ByteTokenizer):
        release_free_memory()
    return batch
