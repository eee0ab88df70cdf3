"""Opening a token dataset directory: checked against its manifest, shards memory-mapped
(the format: `tti_dist.data.dataset_format`).

`open_dataset` checks every shard's sha256 (streamed, 1 MiB blocks), then memory-maps the
shards: the numpy arrays it hands out are zero-copy views of the mapped files, so opening a
dataset costs no RAM beyond the page cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from tti_dist.data.dataset_format import FORMAT_VERSION, MANIFEST_FILE, column_order
from tti_dist.data.sources import sha256_file
from tti_dist.data.tokenizer import Tokenizer, load_tokenizer
from tti_dist.errors import ConfigError


class TokenDataset:
    """An opened dataset: manifest, tokenizer, and zero-copy views of the memory-mapped shards."""

    def __init__(self, path: Path, manifest: dict, tokenizer: Tokenizer,
                 shards: dict[str, list[dict[str, np.ndarray]]]) -> None:
        self.path = path
        self.manifest = manifest
        self.tokenizer = tokenizer
        self._shards = shards

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def splits(self) -> list[str]:
        """Split names, sorted."""
        return sorted(self.manifest["splits"])

    @property
    def column_names(self) -> list[str]:
        """The extra per-token columns (everything but `tokens`), sorted (their file order)."""
        return column_order(self.manifest["columns"])[1:]

    def _check_split(self, split: str) -> None:
        if split not in self._shards:
            raise ConfigError(
                f"data.split: {split!r} is not a split of {str(self.path)!r}; available: {', '.join(self.splits)}"
            )

    def split_shards(self, split: str) -> list[dict[str, np.ndarray]]:
        """Per shard, in order: {column: read-only numpy view of the mapped file}."""
        self._check_split(split)
        return [dict(s) for s in self._shards[split]]

    def num_tokens(self, split: str) -> int:
        self._check_split(split)
        return int(self.manifest["splits"][split]["num_tokens"])

    def num_documents(self, split: str) -> int:
        self._check_split(split)
        return int(self.manifest["splits"][split]["num_documents"])

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.num_tokens(s)}" for s in self.splits)
        return f"TokenDataset({str(self.path)!r}, {self.tokenizer.name}, vocab {self.vocab_size}, tokens {sizes})"



def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST_FILE
    if not path.exists():
        raise ConfigError(f"data.path: {str(path)!r} does not exist")
    if not file.is_file():
        raise ConfigError(f"data.path: {str(path)!r} is not a dataset: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(file.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"data.path: {str(file)!r} is not valid JSON ({exc}); the dataset is corrupt") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"data.path: {str(file)!r} is not a JSON object; the dataset is corrupt")
    missing = [k for k in ("format_version", "tokenizer", "columns", "splits") if k not in manifest]
    if missing:
        raise ConfigError(f"data.path: {str(file)!r} lacks {', '.join(missing)}; the dataset is corrupt")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ConfigError(
            f"data.path: {str(file)!r} has format_version {manifest['format_version']!r}; "
            f"this version of tti_dist reads {FORMAT_VERSION}"
        )
    return manifest


def _map_shard(path: Path, shard: dict, columns: dict) -> dict[str, np.ndarray]:
    file = shard["file"]
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path / file)))
        if reader.num_record_batches != 1:
            raise ValueError(f"{reader.num_record_batches} record batches, expected 1")
        batch = reader.get_batch(0)
        if batch.schema.names != column_order(columns):
            raise ValueError(f"columns {batch.schema.names}, manifest lists {column_order(columns)}")
        arrays = {name: batch.column(name).to_numpy(zero_copy_only=True) for name in columns}
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ConfigError(
            f"data.path: shard {file!r} cannot be read ({exc}); the dataset is corrupt or was modified"
        ) from None
    for name, arr in arrays.items():
        if arr.dtype.name != columns[name]["dtype"] or len(arr) != shard["num_tokens"]:
            raise ConfigError(
                f"data.path: shard {file!r} column {name!r} has {len(arr)} {arr.dtype} rows, manifest "
                f"says {shard['num_tokens']} {columns[name]['dtype']}; the dataset is corrupt or was modified"
            )
    return arrays


def open_dataset(path: str | Path, *, verify: bool = True) -> TokenDataset:
    """Open a dataset directory written by `write_dataset`.

    With `verify`, every shard's sha256 is checked first (reads each file once, streamed).
    Shards are memory-mapped, never read into RAM; row counts and dtypes are always checked
    against the manifest.

    Raises:
        ConfigError (naming `data.path` and the offending file): missing directory or
            manifest, garbled manifest, missing shard, sha256 mismatch, unreadable shard.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    tokenizer = load_tokenizer(path, manifest["tokenizer"])
    columns = manifest["columns"]
    shards: dict[str, list[dict[str, np.ndarray]]] = {}
    for split in sorted(manifest["splits"]):
        entries = manifest["splits"][split]["shards"]
        for shard in entries:
            file = shard["file"]
            if not (path / file).is_file():
                raise ConfigError(
                    f"data.path: shard {file!r} is missing from {str(path)!r}; "
                    "the dataset is incomplete or was modified"
                )
            if verify:
                got = sha256_file(path / file)
                if got != shard["sha256"]:
                    raise ConfigError(
                        f"data.path: shard {file!r} fails its sha256 check (expected {shard['sha256']}, "
                        f"got {got}); the dataset is corrupt or was modified"
                    )
        shards[split] = [_map_shard(path, shard, columns) for shard in entries]
        total = sum(s["num_tokens"] for s in entries)
        if total != manifest["splits"][split]["num_tokens"]:
            raise ConfigError(
                f"data.path: split {split!r} of {str(path / MANIFEST_FILE)!r} lists {total} shard tokens "
                f"but num_tokens {manifest['splits'][split]['num_tokens']}; the dataset is corrupt"
            )
    return TokenDataset(path, manifest, tokenizer, shards)
