"""The metrics table of a run directory: where it lies, its on-disk format, and reading it.

`run_dir/metrics.parquet` holds one row per step (`step`, `tokens`, one float64 column per
tag in first-seen order, null where a tag was not logged at that step), for analysis with
pandas/pyarrow without parsing event files. Read it as one table with
`pq.read_table(path)`, `pd.read_parquet(path)` or `read_metrics(run_dir)`.

On-disk format: `metrics.parquet` is a directory of Parquet part files (a Parquet
dataset), so that a flush writes only a bounded amount, whatever the length of the run::

    metrics.parquet/part-00000000-schema.parquet   zero rows; every column, first-seen order
    metrics.parquet/part-00000001.parquet          the first 512 rows (sealed)
    metrics.parquet/part-00000002.parquet          the rows since (the tail, rewritten per flush)

Three properties of pyarrow's dataset discovery (checked against pyarrow 26, used by
`pq.read_table` and pandas for a directory) shape the layout:

- The dataset schema is inferred from the FIRST file only: columns that appear later in
  the run (eval/* at the first evaluation, interp/* at the end) would be silently dropped.
  Hence the zero-row schema part, which holds every column in first-seen order and is
  rewritten (atomically, a few KB) before any data part that adds a column is written;
  parts without a column read back as null there.
- Files are ordered by path (arrow sorts the listing), and that is the row order of the
  table: part numbers are zero-padded, the schema part sorts first, and each part holds a
  contiguous step range, sorted, so the table comes back sorted by step with one row per
  step.
- Names starting with "." or "_" are ignored: files being written are `.<name>.tmp` and
  become visible only by `os.replace`, so a reader never sees a torn file.

The writer of the table is `tti_dist.metrics.parquet_sink`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tti_dist.rundir import METRICS_NAME

PARQUET_NAME = METRICS_NAME
"""Name of the metrics table (a directory of Parquet parts) inside the run directory."""

RESERVED_COLUMNS = ("step", "tokens")
"""The columns before the tag columns; no metric tag may take these names."""

# Part files: `part-<8 digits>.parquet`, numbered from 1 in step order. The schema part's
# name sorts before every data part ('-' < '.' after the same 8 digits, and its digits are
# 0), because dataset discovery takes the schema from the first file in path order.
_PART_PREFIX = "part-"
_PART_SUFFIX = ".parquet"
_PART_DIGITS = 8
SCHEMA_PART = f"{_PART_PREFIX}{0:0{_PART_DIGITS}d}-schema{_PART_SUFFIX}"
"""Name of the zero-row part that holds every column of the table, in first-seen order."""


def metrics_path(run_dir: str | Path) -> Path:
    """Path of the Parquet metrics table of a run directory.

    A directory of Parquet parts (or, for runs written before the parts format, a single
    file); `pq.read_table`/`pd.read_parquet` read either as one table.
    """
    return Path(run_dir) / PARQUET_NAME


def read_metrics(run_dir: str | Path) -> pa.Table:
    """Read the Parquet metrics table of a run directory (for tests and analysis tools).

    Returns all rows sorted by step: `step`, `tokens`, then one float64 column per tag.
    Raises FileNotFoundError if the run has not flushed any metrics yet.
    """
    path = metrics_path(run_dir)
    if path.is_dir():
        schema_part = path / SCHEMA_PART
        if schema_part.is_file():
            # Name the schema instead of relying on the schema part sorting first: the
            # same columns, without depending on how discovery picks its sample file.
            return pq.read_table(path, schema=pq.read_schema(schema_part))
    return pq.read_table(path)


def part_name(index: int) -> str:
    """File name of data part `index` (numbered from 1 in step order)."""
    return f"{_PART_PREFIX}{index:0{_PART_DIGITS}d}{_PART_SUFFIX}"


def part_files(table_dir: Path) -> list[tuple[int, Path]]:
    """(index, path) of the data parts in table_dir, in index (= step) order."""
    parts = []
    for entry in table_dir.iterdir():
        name = entry.name
        if not (name.startswith(_PART_PREFIX) and name.endswith(_PART_SUFFIX)):
            continue
        digits = name[len(_PART_PREFIX) : -len(_PART_SUFFIX)]
        if len(digits) == _PART_DIGITS and digits.isdigit() and int(digits) > 0:
            parts.append((int(digits), entry))
    return sorted(parts)


def part_step_range(path: Path) -> tuple[int, int] | None:
    """(min, max) step of a part file, None if it has no rows."""
    steps = pq.read_table(path, columns=["step"])["step"]
    if len(steps) == 0:
        return None
    lo_hi = pc.min_max(steps)
    return int(lo_hi["min"].as_py()), int(lo_hi["max"].as_py())


def table_schema(tags: Iterable[str]) -> pa.Schema:
    """Schema of the metrics table with these tag columns."""
    return pa.schema(
        [pa.field("step", pa.int64()), pa.field("tokens", pa.int64())]
        + [pa.field(tag, pa.float64()) for tag in tags]
    )
