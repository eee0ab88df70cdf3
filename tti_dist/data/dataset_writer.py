"""Writing a token dataset directory (the format: `tti_dist.data.dataset_format`).

`write_dataset` (whole arrays) and `DatasetWriter` (documents streamed in, each shard written
as soon as it is full, so memory holds at most about one shard per split) both write into
`<out>.tmp-<pid>` and rename it into place, so a reader never sees a half-written dataset
and a failed or interrupted build never replaces a good one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from tti_dist.data.dataset_format import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    TOKENS_COLUMN,
    TOKENS_DESCRIPTION,
    manifest_bytes,
    tokens_dtype,
)
from tti_dist.data.sources import sha256_file
from tti_dist.data.tokenizer import Tokenizer
from tti_dist.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 16_777_216

_SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def check_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Raise ConfigError (naming --out) unless `out_dir` may be written; return it as a Path.

    An existing non-empty directory is replaced only with `overwrite`, and only if it is a
    dataset (holds a manifest.json), so a mistyped --out never deletes unrelated files.
    """
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError(f"--out: {str(out)!r} exists and is not a directory; choose a new directory")
        if any(out.iterdir()):
            if not overwrite:
                raise ConfigError(
                    f"--out: {str(out)!r} exists and is not empty; pass --overwrite "
                    "(overwrite=True) to replace it, or choose a new directory"
                )
            if not (out / MANIFEST_FILE).is_file():
                raise ConfigError(
                    f"--out: {str(out)!r} is not empty and holds no {MANIFEST_FILE}, so it is not a "
                    "dataset; refusing to replace it even with --overwrite"
                )
    return out


def _shard_bounds(tokens: np.ndarray, eos_id: int, shard_tokens: int) -> list[tuple[int, int]]:
    """[start, end) of each shard: at most shard_tokens long, ending after an EOS when possible."""
    n = len(tokens)
    doc_ends = np.flatnonzero(tokens == eos_id) + 1  # first index after each document
    bounds = []
    start = 0
    while start < n:
        limit = start + shard_tokens
        if limit >= n:
            end = n
        else:
            i = int(np.searchsorted(doc_ends, limit, side="right")) - 1
            end = int(doc_ends[i]) if i >= 0 and doc_ends[i] > start else limit
        bounds.append((start, end))
        start = end
    return bounds


def _arrow_array(a: np.ndarray) -> pa.Array:
    """A zero-copy Arrow view of an integer numpy array. (`pa.array`/`pa.record_batch` would
    also do, but they import pandas, about 40 MB of RSS in a build process that needs none.)"""
    a = np.ascontiguousarray(a)
    return pa.Array.from_buffers(pa.from_numpy_dtype(a.dtype), len(a), [None, pa.py_buffer(a)])


def _write_shard(path: Path, columns: dict[str, np.ndarray]) -> None:
    # One record batch per file, so each column is one contiguous chunk that numpy can view.
    batch = pa.RecordBatch.from_arrays([_arrow_array(a) for a in columns.values()], names=list(columns))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)


def _check_splits(splits: dict, num_documents: dict, tokenizer: Tokenizer,
                  column_descriptions: dict[str, str] | None) -> tuple[list[str], dict[str, np.dtype]]:
    """Validate the caller's arrays; return (extra column names, their dtypes). ValueError if bad."""
    if "train" not in splits:
        raise ValueError(f"splits must contain 'train'; got {sorted(splits)}")
    if set(num_documents) != set(splits):
        raise ValueError(f"num_documents keys {sorted(num_documents)} differ from splits {sorted(splits)}")
    extra_names: list[str] | None = None
    extra_dtypes: dict[str, np.dtype] = {}
    for split, cols in splits.items():
        if not _SPLIT_NAME.match(split):
            raise ValueError(f"split name {split!r} must match {_SPLIT_NAME.pattern}")
        if TOKENS_COLUMN not in cols:
            raise ValueError(f"split {split!r} has no {TOKENS_COLUMN!r} column")
        names = sorted(c for c in cols if c != TOKENS_COLUMN)
        if extra_names is None:
            extra_names = names
        elif names != extra_names:
            raise ValueError(f"split {split!r} has columns {names}, another split has {extra_names}")
        tokens = np.asarray(cols[TOKENS_COLUMN])
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{split}.tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
        if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= tokenizer.vocab_size):
            raise ValueError(
                f"{split}.tokens has ids outside [0, {tokenizer.vocab_size}): "
                f"min {int(tokens.min())}, max {int(tokens.max())}"
            )
        for name in names:
            arr = np.asarray(cols[name])
            if arr.shape != tokens.shape or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(
                    f"{split}.{name} must be an integer array of shape {tokens.shape}, "
                    f"got {arr.dtype} {arr.shape}"
                )
            if extra_dtypes.setdefault(name, arr.dtype) != arr.dtype:
                raise ValueError(f"column {name!r} has dtype {arr.dtype} in {split!r}, {extra_dtypes[name]} elsewhere")
        n = num_documents[split]
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"num_documents[{split!r}] must be a non-negative int, got {n!r}")
    unknown = set(column_descriptions or {}) - set(extra_names or [])
    if unknown:
        raise ValueError(f"column_descriptions names columns that are not in the splits: {sorted(unknown)}")
    return extra_names or [], extra_dtypes


def write_dataset(
    out_dir: str | Path,
    *,
    splits: dict[str, dict[str, np.ndarray]],
    tokenizer: Tokenizer,
    source: dict,
    num_documents: dict[str, int],
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    column_descriptions: dict[str, str] | None = None,
    build: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a dataset directory atomically and return its manifest.

    Args:
        out_dir: the dataset directory to create.
        splits: {"train": {"tokens": 1-D int array, "<col>": same-length int array, ...},
            "val": {...}}; "train" is required, every split has the same columns. Tokens are
            already packed (each document followed by `tokenizer.eos_id`); extra columns keep
            their integer dtype.
        tokenizer: saved into the directory; its vocab_size bounds the ids and picks the
            token dtype (uint16 up to 65,536, else uint32).
        source: the manifest's `source` entry (`describe_source` output, or a generator's
            description); must be JSON-serialisable.
        num_documents: documents per split, recorded in the manifest.
        shard_tokens: the most tokens per shard file.
        column_descriptions: {column: description} for extra columns (default "").
        build: parameters that produced the data, recorded as the manifest's `build` entry.
        overwrite: replace an existing dataset at `out_dir`.

    Raises:
        ConfigError: `out_dir` exists and is not empty (without `overwrite`), or is not a
            dataset; `shard_tokens` is not positive.
        ValueError: inconsistent arrays (a caller bug).
    """
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ConfigError(f"--shard-tokens: {shard_tokens!r} is not allowed; use a positive number of tokens")
    extra_names, extra_dtypes = _check_splits(splits, num_documents, tokenizer, column_descriptions)
    out = check_out_dir(out_dir, overwrite)
    dtype = tokens_dtype(tokenizer.vocab_size)
    descriptions = column_descriptions or {}
    manifest: dict = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "build": build or {},
        "dtype": dtype.name,
        "shard_tokens": shard_tokens,
        "columns": {
            TOKENS_COLUMN: {"dtype": dtype.name, "description": TOKENS_DESCRIPTION},
            **{name: {"dtype": extra_dtypes[name].name, "description": descriptions.get(name, "")}
               for name in extra_names},
        },
        "splits": {},
    }
    manifest_bytes(manifest)  # fail on a non-serialisable `source`/`build` before writing anything

    tmp = _make_tmp(out)
    try:
        manifest["tokenizer"] = tokenizer.save(tmp)
        for split in sorted(splits):
            cols = splits[split]
            tokens = np.asarray(cols[TOKENS_COLUMN])
            shards = []
            for k, (start, end) in enumerate(_shard_bounds(tokens, tokenizer.eos_id, shard_tokens)):
                file = f"{split}-{k:05d}.arrow"
                columns = {TOKENS_COLUMN: tokens[start:end].astype(dtype, copy=False)}
                columns.update((name, np.asarray(cols[name])[start:end]) for name in extra_names)
                _write_shard(tmp / file, columns)
                shards.append({"file": file, "num_tokens": end - start, "sha256": sha256_file(tmp / file)})
            manifest["splits"][split] = {
                "num_tokens": len(tokens),
                "num_documents": int(num_documents[split]),
                "shards": shards,
            }
        _publish(tmp, out, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _make_tmp(out: Path) -> Path:
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crashed earlier build in a process with the same pid
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path, manifest: dict) -> None:
    """Write the manifest last, then rename `tmp` to `out` (replacing a previous dataset)."""
    (tmp / MANIFEST_FILE).write_bytes(manifest_bytes(manifest))
    if out.exists():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)
    logger.info(
        "wrote dataset %s: %s", out,
        ", ".join(f"{s} {v['num_tokens']} tokens in {len(v['shards'])} shards"
                  for s, v in manifest["splits"].items()),
    )


_LAZY_BUFFER_BYTES = 256 * 1024 * 1024
"""A split's shard buffer up to this size is allocated whole at the start: pages numpy has
not written cost no RAM, and a full-size buffer is never copied to grow. A larger one (a
huge --shard-tokens) starts at `_MIN_SHARD_BUFFER` tokens and doubles."""
_MIN_SHARD_BUFFER = 1 << 20


class _SplitWriter:
    """Packs one split's documents into shard files of at most `shard_tokens` tokens.

    The cut rule is `_shard_bounds`' applied to the stream: when the buffer holds
    `shard_tokens` tokens, the shard ends after the last complete document in it, or at
    `shard_tokens` when a single document fills it (that document spans shards). So the
    shards are those `write_dataset` would write for the whole split at once.
    """

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory = directory
        self.split = split
        self.shard_tokens = shard_tokens
        lazy = shard_tokens * np.dtype(dtype).itemsize <= _LAZY_BUFFER_BYTES
        self._buf = np.empty(shard_tokens if lazy else min(shard_tokens, _MIN_SHARD_BUFFER), dtype=dtype)
        self._fill = 0
        self._last_doc_end = 0  # buffer position just after the last complete document; 0 = none
        self.shards: list[dict] = []
        self.num_tokens = 0
        self.num_documents = 0
        self.peak_buffer_tokens = 0

    def append(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Add whole documents: `tokens` packed (each document ends with EOS), `doc_lengths`
        their lengths in tokens."""
        doc_ends = np.cumsum(doc_lengths)
        assert (doc_ends[-1] if len(doc_ends) else 0) == len(tokens), "doc_lengths must sum to len(tokens)"
        pos, n = 0, len(tokens)
        while pos < n:
            take = min(n - pos, self.shard_tokens - self._fill)
            self._reserve(self._fill + take)
            self._buf[self._fill:self._fill + take] = tokens[pos:pos + take]
            i = int(np.searchsorted(doc_ends, pos + take, side="right")) - 1
            if i >= 0 and doc_ends[i] > pos:
                self._last_doc_end = self._fill + int(doc_ends[i]) - pos
            self._fill += take
            pos += take
            self.peak_buffer_tokens = max(self.peak_buffer_tokens, self._fill)
            if self._fill == self.shard_tokens:
                self._flush(self._last_doc_end or self._fill)
        self.num_tokens += n
        self.num_documents += len(doc_lengths)

    def finish(self) -> dict:
        """Write the last shard; return the manifest's entry for the split."""
        if self._fill:
            self._flush(self._fill)
        self._buf = np.empty(0, dtype=self._buf.dtype)
        return {"num_tokens": self.num_tokens, "num_documents": self.num_documents, "shards": self.shards}

    def _reserve(self, size: int) -> None:
        if size > len(self._buf):  # only with a buffer over _LAZY_BUFFER_BYTES
            grown = np.empty(min(self.shard_tokens, max(size, 2 * len(self._buf))), dtype=self._buf.dtype)
            grown[:self._fill] = self._buf[:self._fill]
            self._buf = grown

    def _flush(self, end: int) -> None:
        file = f"{self.split}-{len(self.shards):05d}.arrow"
        _write_shard(self.directory / file, {TOKENS_COLUMN: self._buf[:end]})
        self.shards.append({"file": file, "num_tokens": end, "sha256": sha256_file(self.directory / file)})
        rest = self._fill - end
        # The rest holds no document end (the cut is after the last one), only the start of
        # a document that continues.
        self._buf[:rest] = self._buf[end:self._fill].copy()
        self._fill = rest
        self._last_doc_end = 0


class DatasetWriter:
    """Write a dataset directory from documents streamed in order, one shard at a time.

    Usage::

        with DatasetWriter(out, tokenizer, shard_tokens=..., overwrite=...) as writer:
            writer.append("train", tokens, doc_lengths)   # repeatedly, in document order
            manifest = writer.commit(source=..., build=...)

    Everything goes to `<out>.tmp-<pid>`; `commit` writes the manifest and renames the
    directory into place. Leaving the `with` block without committing (an exception, a
    KeyboardInterrupt) deletes the temporary directory and leaves `out` as it was. Memory:
    per split one shard buffer of at most `shard_tokens` tokens.
    """

    def __init__(self, out_dir: str | Path, tokenizer: Tokenizer, *, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 overwrite: bool = False, splits: tuple[str, ...] = ("train", "val")) -> None:
        if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
            raise ConfigError(f"--shard-tokens: {shard_tokens!r} is not allowed; use a positive number of tokens")
        self.out = check_out_dir(out_dir, overwrite)
        self.tokenizer = tokenizer
        self.shard_tokens = shard_tokens
        self.dtype = tokens_dtype(tokenizer.vocab_size)
        self._tmp: Path | None = _make_tmp(self.out)
        try:
            self._tokenizer_info = tokenizer.save(self._tmp)
        except BaseException:
            self.abort()
            raise
        self._splits = {s: _SplitWriter(self._tmp, s, self.dtype, shard_tokens) for s in splits}

    def append(self, split: str, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append whole documents to `split` (see `_SplitWriter.append`)."""
        assert self._tmp is not None, "the writer is closed"
        self._splits[split].append(tokens, doc_lengths)

    def num_documents(self, split: str) -> int:
        return self._splits[split].num_documents

    @property
    def peak_buffer_tokens(self) -> int:
        """The most tokens any split's shard buffer has held."""
        return max(w.peak_buffer_tokens for w in self._splits.values())

    def commit(self, *, source: dict, build: dict | None = None) -> dict:
        """Write the last shards and the manifest, move the dataset into place; return the manifest."""
        assert self._tmp is not None, "the writer is closed"
        manifest: dict = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "build": build or {},
            "dtype": self.dtype.name,
            "shard_tokens": self.shard_tokens,
            "columns": {TOKENS_COLUMN: {"dtype": self.dtype.name, "description": TOKENS_DESCRIPTION}},
            "tokenizer": self._tokenizer_info,
            "splits": {split: self._splits[split].finish() for split in sorted(self._splits)},
        }
        _publish(self._tmp, self.out, manifest)
        self._tmp = None
        return manifest

    def abort(self) -> None:
        """Delete the temporary directory (nothing at `out` changes)."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()  # a no-op after commit
