"""Documents from what researchers have on disk, in a deterministic order.

A *source* is one of:

- ``"stdlib"``: every ``*.py`` file of the running interpreter's standard library (third-party
  ``site-packages``/``dist-packages`` excluded), sorted by relative POSIX path;
- ``"shakespeare"``: the works of Shakespeare from the package ``shakespeare`` 0.6, one
  modern-spelling edition, one document per work with the Project Gutenberg boilerplate
  removed (`tti_dist.data.shakespeare`);
- a text file: one document;
- a ``*.jsonl`` file: one JSON object per line, the document is ``obj[text_field]``;
- a ``*.parquet`` file or a ``*.arrow`` file (Arrow IPC file *or* stream format, which is what
  HuggingFace ``datasets`` writes with ``save_to_disk``): one document per row of the string
  column ``text_field``; read batch by batch (Parquet by row groups), so a large file is
  never loaded whole. Both are read with plain file reads, not memory maps: the pages of a
  map that has been read stay in the process's resident set, which would then grow with the
  file (a dataset build's memory must not);
- a directory: every regular non-hidden file under it, recursively, sorted by relative POSIX
  path; files ending ``.jsonl``/``.parquet``/``.arrow`` are read as above, any other file is
  one text document.

Empty documents (empty files, empty strings, null cells) are skipped: each would only add a
lone end-of-document token. With ``max_bytes``, reading stops once that many bytes of text are
read; the last document is cut there, backed off to a UTF-8 character boundary (at most 3
bytes fewer) so a subword tokenizer can round-trip it exactly.

`describe_source` also returns what a dataset manifest records about the
source: its kind, the path as given, and every file read with its size and sha256, so a
build can be reproduced and checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tti_dist.data import shakespeare
from tti_dist.data.shakespeare import SHAKESPEARE_SOURCE
from tti_dist.errors import ConfigError

logger = logging.getLogger(__name__)

STDLIB_SOURCE = "stdlib"
"""`data.source` value naming the running interpreter's standard-library `*.py` files."""

_EXCLUDED_STDLIB_DIRS = ("site-packages", "dist-packages")


def stdlib_files() -> list[tuple[str, Path]]:
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


def directory_files(root: Path) -> list[tuple[str, Path]]:
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



JSONL_SUFFIX = ".jsonl"
PARQUET_SUFFIX = ".parquet"
ARROW_SUFFIX = ".arrow"
STRUCTURED_SUFFIXES = (JSONL_SUFFIX, PARQUET_SUFFIX, ARROW_SUFFIX)
"""File suffixes read as records with a text field rather than as one text document."""

_HASH_BLOCK_BYTES = 1024 * 1024
_ROWS_PER_BATCH = 1024
_ARROW_FILE_MAGIC = b"ARROW1"


@dataclass(frozen=True)
class Document:
    """One document of a source."""

    name: str
    """Stable name: the file's relative POSIX path; for records `<file>:<line>` (JSONL, 1-based)
    or `<file>:<row>` (Parquet/Arrow, 0-based)."""
    text: bytes
    """The document's raw UTF-8 bytes."""


@dataclass(frozen=True)
class _SourceFile:
    rel: str
    """Relative POSIX path recorded in the manifest (the file name for a single-file source)."""
    path: Path
    """Path to open."""
    kind: str
    """How to read it: "text", "jsonl", "parquet", "arrow" or "shakespeare" (text to clean)."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, streamed through one reused 1 MiB buffer (never loads the file
    whole, and allocates nothing per block: `f.read` would hold two fresh blocks at once)."""
    digest = hashlib.sha256()
    block = bytearray(_HASH_BLOCK_BYTES)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            digest.update(view[:n])
    return digest.hexdigest()


def _file_kind(name: str) -> str:
    for suffix in STRUCTURED_SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    return "text"


def _plan(source: str, warn: bool = True) -> tuple[str, list[_SourceFile]]:
    """(source kind, files to read in order); raises ConfigError for a missing path."""
    if source == STDLIB_SOURCE:
        return "stdlib", [_SourceFile(rel, path, "text") for rel, path in stdlib_files()]
    if source == SHAKESPEARE_SOURCE:
        works = shakespeare.shakespeare_files()
        return "shakespeare", [_SourceFile(rel, path, "shakespeare") for rel, path in works]
    root = Path(source)
    if not root.exists():
        raise ConfigError(
            f"data.source: {source!r} does not exist; use \"{STDLIB_SOURCE}\", \"{SHAKESPEARE_SOURCE}\" or a "
            "path to a text "
            f"file, a directory, or a {', '.join('*' + s for s in STRUCTURED_SUFFIXES)} file"
        )
    if root.is_dir():
        files = [_SourceFile(rel, path, _file_kind(rel)) for rel, path in directory_files(root)]
        num_structured = sum(f.kind != "text" for f in files)
        if warn and 0 < num_structured < len(files):
            # E.g. a HuggingFace `save_to_disk` folder: its dataset_info.json/state.json would
            # become text documents. Not an error (a folder of mixed files is legitimate).
            logger.warning(
                "data.source=%r mixes %d record files (%s) with %d other files, which are read "
                "as plain-text documents",
                source, num_structured, "/".join(STRUCTURED_SUFFIXES), len(files) - num_structured,
            )
        return "directory", files
    kind = _file_kind(root.name)
    return ("file" if kind == "text" else kind), [_SourceFile(root.name, root, kind)]


def _utf8_prefix(data: bytes, limit: int) -> bytes:
    """`data[:limit]`, shortened by up to 3 bytes so it does not end inside a UTF-8 character."""
    cut = data[:limit]
    if len(cut) == len(data):
        return cut
    # Look back at most 3 bytes for the lead byte of the last (possibly incomplete) sequence.
    for back in range(1, min(4, len(cut) + 1)):
        byte = cut[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return cut[:-back] if need > back else cut
    return cut


def _check_column(schema: pa.Schema, text_field: str, path: Path) -> None:
    if text_field not in schema.names:
        raise ConfigError(
            f"data.text_field: {text_field!r} is not a column of {str(path)!r}; "
            f"columns present: {', '.join(schema.names) or '(none)'}"
        )
    col_type = schema.field(text_field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)
            or pa.types.is_string_view(col_type)):
        raise ConfigError(
            f"data.text_field: column {text_field!r} of {str(path)!r} has type {col_type}; "
            "a string column is needed"
        )


def _string_cells(column: pa.Array) -> list[bytes | None]:
    # string -> large_binary is a zero-copy reinterpretation of the UTF-8 data; it yields bytes
    # without decoding to str and encoding back.
    return column.cast(pa.large_binary()).to_pylist()


class _Reader:
    """Reads a source's documents once, remembering which files it read."""

    def __init__(self, source: str, text_field: str, max_bytes: int | None, *, warn: bool = True) -> None:
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                      or max_bytes < 1):
            raise ConfigError(
                f"data.max_bytes: {max_bytes!r} is not allowed; use a positive number of bytes"
            )
        if not isinstance(text_field, str) or not text_field:
            raise ConfigError(f"data.text_field: {text_field!r} is not allowed; use a column/field name")
        self.source = source
        self.warn = warn  # False for a pass that re-reads what another pass warns about
        self.text_field = text_field
        self.max_bytes = max_bytes
        self.kind, self._files = _plan(source, warn)
        self.files_read: list[_SourceFile] = []
        self.num_documents = 0
        self.num_bytes = 0
        self._num_null = 0
        self._num_non_ascii = 0
        self._budget_spent = False

    def _budget_left(self) -> int | None:
        if self.max_bytes is None:
            return None
        return 0 if self._budget_spent else self.max_bytes - self.num_bytes

    def __iter__(self) -> Iterator[Document]:
        for file in self._files:
            left = self._budget_left()
            if left is not None and left <= 0:
                break
            self.files_read.append(file)
            records = {
                "text": self._text, "jsonl": self._jsonl, "parquet": self._parquet, "arrow": self._arrow,
                "shakespeare": self._shakespeare,
            }[file.kind](file)
            for name, text in records:
                if not text:
                    continue
                left = self._budget_left()
                if left is not None and len(text) > left:
                    text = _utf8_prefix(text, left)
                    self._budget_spent = True  # whatever the UTF-8 back-off left unread
                    if text:
                        self.num_bytes += len(text)
                        self.num_documents += 1
                        yield Document(name, text)
                    break
                self.num_bytes += len(text)
                self.num_documents += 1
                yield Document(name, text)
        if self._num_null and self.warn:
            logger.warning(
                "data.source=%r: skipped %d null %r cells", self.source, self._num_null, self.text_field
            )
        if self.num_documents == 0:
            raise ConfigError(f"data.source: {self.source!r} contains no text")

    def _text(self, file: _SourceFile) -> Iterator[tuple[str, bytes]]:
        left = self._budget_left()
        with open(file.path, "rb") as f:
            # Reading at most the remaining budget (+3 bytes so the UTF-8 back-off sees whether
            # the cut is inside a character) keeps a huge last file from being loaded whole.
            yield file.rel, (f.read() if left is None else f.read(left + 3))

    def _shakespeare(self, file: _SourceFile) -> Iterator[tuple[str, bytes]]:
        # Read whole (the largest work is 176 kB): the footer is found only at the end.
        text = shakespeare.clean_text(file.path.read_bytes(), file.rel)
        self._num_non_ascii += shakespeare.count_non_ascii(text)
        yield file.rel, text

    def _jsonl(self, file: _SourceFile) -> Iterator[tuple[str, bytes]]:
        field = self.text_field
        with open(file.path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{str(file.path)!r} line {lineno}"
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise ConfigError(f"data.source: {where} is not valid JSON ({exc})") from None
                if not isinstance(obj, dict):
                    raise ConfigError(
                        f"data.source: {where} is a JSON {type(obj).__name__}; each line must be an object"
                    )
                if field not in obj:
                    raise ConfigError(
                        f"data.text_field: {field!r} is missing in {where}; "
                        f"fields present: {', '.join(sorted(obj)) or '(none)'}"
                    )
                text = obj[field]
                if not isinstance(text, str):
                    raise ConfigError(
                        f"data.text_field: {field!r} in {where} is a JSON "
                        f"{'null' if text is None else type(text).__name__}, not a string"
                    )
                # Lone surrogates (legal in JSON escapes, not in UTF-8) become U+FFFD.
                yield f"{file.rel}:{lineno}", text.encode("utf-8", errors="replace")
                if (left := self._budget_left()) is not None and left <= 0:
                    return

    def _cells(self, file: _SourceFile, batches) -> Iterator[tuple[str, bytes]]:
        row = 0
        for column in batches:
            for cell in _string_cells(column):
                if cell is None:
                    self._num_null += 1
                else:
                    yield f"{file.rel}:{row}", cell
                row += 1
            if (left := self._budget_left()) is not None and left <= 0:
                return

    def _parquet(self, file: _SourceFile) -> Iterator[tuple[str, bytes]]:
        try:
            # Not memory-mapped (see the module docstring), and without pre_buffer, which keeps
            # every column chunk read so far cached until the file is closed.
            pf = pq.ParquetFile(file.path, memory_map=False, pre_buffer=False)
        except (pa.ArrowException, OSError) as exc:
            raise ConfigError(f"data.source: {str(file.path)!r} is not a readable Parquet file ({exc})") from None
        _check_column(pf.schema_arrow, self.text_field, file.path)
        # iter_batches decodes one row group at a time and only the text column.
        batches = (b.column(0) for b in pf.iter_batches(batch_size=_ROWS_PER_BATCH, columns=[self.text_field]))
        yield from self._cells(file, batches)

    def _arrow(self, file: _SourceFile) -> Iterator[tuple[str, bytes]]:
        with open(file.path, "rb") as f:
            is_file_format = f.read(len(_ARROW_FILE_MAGIC)) == _ARROW_FILE_MAGIC
        with pa.OSFile(str(file.path)) as source:  # not memory-mapped: see the module docstring
            try:
                reader = pa.ipc.open_file(source) if is_file_format else pa.ipc.open_stream(source)
            except (pa.ArrowException, OSError) as exc:
                raise ConfigError(
                    f"data.source: {str(file.path)!r} is not a readable Arrow IPC file or stream ({exc})"
                ) from None
            _check_column(reader.schema, self.text_field, file.path)
            if is_file_format:
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            yield from self._cells(file, (b.column(self.text_field) for b in batches))

    def describe(self) -> dict:
        """The manifest's `source` entry; call after iterating."""
        desc: dict = {
            "kind": self.kind,
            "path": self.source,
            "files": [
                {"path": f.rel, "size": f.path.stat().st_size, "sha256": sha256_file(f.path)}
                for f in self.files_read
            ],
            "num_documents": self.num_documents,
            "num_bytes": self.num_bytes,
        }
        if self.kind == "stdlib":
            # The stdlib differs between interpreter versions; the root path is machine-specific
            # and left out so manifests compare across machines with the same Python.
            desc["python"] = f"{sys.implementation.name} {platform.python_version()}"
        if self.kind == "shakespeare":
            # Sizes and hashes are of the package's files; num_bytes counts the cleaned text.
            desc.update(shakespeare.describe())
            desc["non_ascii_bytes"] = self._num_non_ascii
        if any(f.kind in ("jsonl", "parquet", "arrow") for f in self.files_read):
            desc["text_field"] = self.text_field
        return desc


def iter_documents(
    source: str, *, text_field: str = "text", max_bytes: int | None = None
) -> Iterator[Document]:
    """Yield the documents of `source` in a deterministic order (see the module docstring).

    Raises:
        ConfigError: the path does not exist (or the shakespeare package is not installed,
            or one of its texts keeps Gutenberg boilerplate), a record lacks `text_field` or
            it is not a string, a Parquet/Arrow file has no such string column, `max_bytes`
            is not positive, or the source holds no text (raised when the iteration ends).
    """
    yield from _Reader(source, text_field, max_bytes)


def describe_source(source: str, text_field: str = "text", *, max_bytes: int | None = None) -> dict:
    """What a manifest records about a source: its kind ("stdlib", "shakespeare", "file",
    "directory", "jsonl", "parquet", "arrow"), the path as given, the files read (relative
    paths, sizes, sha256), and the number of documents and bytes of text read with `max_bytes`."""
    reader = _Reader(source, text_field, max_bytes)
    for _ in reader:
        pass
    return reader.describe()
