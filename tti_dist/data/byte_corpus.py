"""Byte-level text corpus: read documents from a text source and turn them into token ids.

The tokenizer is the identity on bytes (ids 0..255) plus one end-of-document separator
(`EOS_TOKEN` = 256), so the vocabulary is fixed (`BYTE_VOCAB_SIZE` = 257), needs no
training or download, and encoding is exact and reversible. That keeps the data path free of
external state: every rank that reads the same source with the same `max_bytes` builds the
identical token array, so ranks never need to exchange data.

The default source, "stdlib", is the running interpreter's own standard-library sources:
several megabytes of real text that exist on every machine that can run the trainer.
Documents are always read in a sorted order so the corpus does not depend on file-system
listing order.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tti_dist.errors import ConfigError

logger = logging.getLogger(__name__)

EOS_TOKEN = 256
"""Token id that ends every document (one past the largest byte value)."""

BYTE_VOCAB_SIZE = 257
"""Number of distinct token ids: 256 byte values plus `EOS_TOKEN`."""

STDLIB_SOURCE = "stdlib"
"""`data.source` value naming the running interpreter's standard-library `*.py` files."""

_EOS_TEXT = "\n<|eos|>\n"
_EXCLUDED_STDLIB_DIRS = ("site-packages", "dist-packages")


def _stdlib_files() -> list[tuple[str, Path]]:
    """(relative POSIX path, absolute path) of every stdlib `*.py` file, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[tuple[str, Path]] = []
    # os.walk with pruning is several times faster than Path.rglob, and pruning keeps
    # third-party packages (which differ between environments) out of the corpus.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if not any(ex in d for ex in _EXCLUDED_STDLIB_DIRS)
        ]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.endswith(".py"):
                continue
            rel = (rel_dir / name).as_posix()
            if any(ex in rel for ex in _EXCLUDED_STDLIB_DIRS):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                files.append((rel, path))
    files.sort(key=lambda item: item[0])
    return files


def _directory_files(root: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, absolute path) of every non-hidden regular file under root, sorted."""
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden entries (.git, .venv, editor swap files) are tooling state, not corpus text.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                files.append(((rel_dir / name).as_posix(), path))
    files.sort(key=lambda item: item[0])
    return files


def _read_documents(paths: Iterable[Path], max_bytes: int | None) -> list[bytes]:
    """Read files in order until the byte budget is spent; empty files are skipped."""
    docs: list[bytes] = []
    num_bytes = 0
    for path in paths:
        if max_bytes is not None and num_bytes >= max_bytes:
            break
        with open(path, "rb") as f:
            # Reading only the remaining budget keeps a huge last file from being loaded whole.
            data = f.read() if max_bytes is None else f.read(max_bytes - num_bytes)
        if not data:
            continue
        docs.append(data)
        num_bytes += len(data)
    return docs


def read_text_source(source: str, max_bytes: int | None) -> list[bytes]:
    """Read the documents of a text source, in a deterministic order.

    Args:
        source: "stdlib" for every `*.py` file of the running interpreter's standard
            library (third-party `site-packages`/`dist-packages` excluded), sorted by
            relative POSIX path; otherwise a path to a text file (one document) or a
            directory (every non-hidden regular file under it, recursively, sorted by
            relative path).
        max_bytes: stop once this many bytes are read; the last document is truncated so
            the total is exactly `max_bytes` when the source is larger. None reads all.

    Returns:
        The documents' raw bytes. Empty files are skipped (they would only add a lone EOS).

    Raises:
        ConfigError: the path does not exist, `max_bytes` is not positive, or the source
            holds no text.
    """
    if max_bytes is not None and max_bytes < 1:
        raise ConfigError(f"data.max_bytes: {max_bytes!r} is not allowed; use a positive number of bytes")
    if source == STDLIB_SOURCE:
        paths = [path for _, path in _stdlib_files()]
    else:
        root = Path(source)
        if not root.exists():
            raise ConfigError(
                f"data.source: {source!r} does not exist; "
                f'use "{STDLIB_SOURCE}" or a path to a text file or directory'
            )
        paths = [path for _, path in _directory_files(root)] if root.is_dir() else [root]
    docs = _read_documents(paths, max_bytes)
    if not docs:
        raise ConfigError(f"data.source: {source!r} contains no text")
    logger.debug(
        "read %d documents, %d bytes from data.source=%r", len(docs), sum(map(len, docs)), source
    )
    return docs


def encode_documents(docs: list[bytes]) -> np.ndarray:
    """Token ids of the documents: each document's bytes followed by `EOS_TOKEN`, concatenated.

    Returns a 1-D uint16 array of length `sum(len(d) for d in docs) + len(docs)`.
    """
    num_tokens = sum(len(d) for d in docs) + len(docs)
    tokens = np.empty(num_tokens, dtype=np.uint16)
    pos = 0
    for doc in docs:
        end = pos + len(doc)
        tokens[pos:end] = np.frombuffer(doc, dtype=np.uint8)
        tokens[end] = EOS_TOKEN
        pos = end + 1
    return tokens


def decode_tokens(tokens) -> str:
    """Text of a token sequence (numpy array, torch tensor or list of ints).

    Byte runs are decoded as UTF-8 with errors="replace"; `EOS_TOKEN` is rendered as
    "\\n<|eos|>\\n". Ids outside the byte vocabulary (a model whose embedding is padded past
    `BYTE_VOCAB_SIZE` can sample them) render as U+FFFD so sampled text always decodes.
    """
    if hasattr(tokens, "detach"):
        # A torch tensor may live on an accelerator; numpy can only read host memory.
        tokens = tokens.detach().cpu().numpy()
    ids = np.asarray(tokens).astype(np.int64, copy=False).reshape(-1)
    parts: list[str] = []
    start = 0
    for pos in np.flatnonzero((ids < 0) | (ids > 255)).tolist():
        if pos > start:
            parts.append(ids[start:pos].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
        parts.append(_EOS_TEXT if ids[pos] == EOS_TOKEN else "\ufffd")
        start = pos + 1
    if start < len(ids):
        parts.append(ids[start:].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
    return "".join(parts)
