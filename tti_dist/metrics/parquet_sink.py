"""The Parquet sink of the metrics writer: the table `run_dir/metrics.parquet/`, written as a
directory of Parquet parts (the format and its reader: `tti_dist.metrics.metrics_table`).

Why: rewriting one whole-run file per flush made the cost of a `log` grow with the row
count (0.38 ms per call at step 2,000, 7.1 ms at step 40,000 with 30 tags), so logging
cost was quadratic in the run length. Now the writer holds only the tail part (at most
`rows_per_part` rows, plus parts sealed since the last flush) and a flush rewrites that
one file; a part that reaches `rows_per_part` rows is sealed when a later step arrives
and is not written again (unless a step it holds is logged again, which the training loop
does not do). The cost of a `log` and the writer's memory are therefore
independent of the run length, and the number of files grows by one per
`rows_per_part` rows.

Restarts must not leave duplicate or stale data behind. A run that crashed after step 37
and resumes from the checkpoint at step 30 opens the writer with `resume_step=30`: parts
after step 30 are deleted, the one straddling it is rewritten without the later rows,
and TensorBoard is told to discard its events after step 30 through its own mechanism
(`purge_step`, a SessionLog.START event that the event reader applies when it reaches the
new file). Opening without `resume_step` starts a fresh run: the old table is discarded
and old TensorBoard events are purged the same way (from step 0). A run directory written
by the previous format (a single-file `metrics.parquet`) is converted to parts when
resumed, and simply replaced by a fresh run.

Crash safety: every file is written under a hidden temporary name and moved into place
with `os.replace`, so a process killed at any point (SIGKILL included) leaves a readable
table holding every row up to its last completed flush, possibly some rows of the flush
it was in, never a duplicate row. A crashed (never closed) run therefore leaves the same
layout as a closed one, read the same way; at most a hidden `.*.tmp` file remains, which
readers ignore and the next open deletes. `close` does not compact the parts: compacting
into one file could not replace the directory atomically. (Durability against power loss
is not attempted: nothing is fsynced, as before.)
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tti_dist.errors import RunWriteError, os_reason
from tti_dist.metrics.metrics_table import (
    PARQUET_NAME,
    RESERVED_COLUMNS,
    SCHEMA_PART,
    metrics_path,
    part_files,
    part_name,
    part_step_range,
    table_schema,
)

logger = logging.getLogger(__name__)

# Sibling names in the run directory used while replacing the whole table. They start
# with "." so that nothing that lists the run directory for runs or files trips on them.
_LEGACY_BACKUP = f".{PARQUET_NAME}.legacy"
_STAGING_DIR = f".{PARQUET_NAME}.staging"
_DISCARD_PREFIX = f".{PARQUET_NAME}.discard-"
DEFAULT_ROWS_PER_PART = 512
"""Rows after which the tail part is sealed. Writing a Parquet file of up to ~500 rows x
30 float columns costs about the same as writing 20 rows (fixed per-column overhead
dominates), so 512 keeps the per-flush cost near its floor while a 100k-step run stays
at ~200 files."""


def _write_atomically(table: pa.Table, path: Path) -> None:
    """Write table to path so that readers see the old file or the new one, whole.

    The temporary name starts with "." so that dataset discovery skips it while it is
    being written; os.replace is atomic on POSIX within one directory.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunWriteError(f"{path}: could not write metrics: {os_reason(exc)}") from exc


def _remove_tree(path: Path) -> None:
    """Delete a directory tree after moving it out of the way in one atomic rename, so
    that a crash mid-deletion leaves a hidden leftover (removed at the next open), never
    a half-deleted table under the real name."""
    doomed = path.with_name(f"{_DISCARD_PREFIX}{os.getpid()}-{time.time_ns()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


class _Part:
    """The rows of one part file, held in memory while they may still change.

    Column-wise storage, so that writing the part needs no pivoting: `steps[i]`,
    `tokens[i]` and `columns[tag][i]` form row i (rows in arrival order; sorted by step
    when written).
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.steps: list[int] = []
        self.tokens: list[int] = []
        self.columns: dict[str, list[float | None]] = {}
        self.row_of_step: dict[int, int] = {}
        self.max_step: int | None = None
        # Whether the rows differ from the part file on disk (or there is none yet).
        self.dirty = False

    @classmethod
    def from_table(cls, index: int, table: pa.Table) -> _Part:
        part = cls(index)
        part.steps = [int(s) for s in table["step"].to_pylist()]
        part.tokens = [int(t) for t in table["tokens"].to_pylist()]
        for name in table.column_names:
            if name not in RESERVED_COLUMNS:
                part.columns[name] = table[name].cast(pa.float64()).to_pylist()
        part.row_of_step = {step: i for i, step in enumerate(part.steps)}
        part.max_step = max(part.steps) if part.steps else None
        return part

    def __len__(self) -> int:
        return len(self.steps)

    def merge(self, step: int, tokens: int, values: Mapping[str, float]) -> None:
        """Add the row of a step, or merge values into it (later values win)."""
        row = self.row_of_step.get(step)
        if row is None:
            row = len(self.steps)
            self.row_of_step[step] = row
            self.steps.append(step)
            self.tokens.append(tokens)
            for column in self.columns.values():
                column.append(None)
            if self.max_step is None or step > self.max_step:
                self.max_step = step
        else:
            self.tokens[row] = tokens
        for tag, value in values.items():
            column = self.columns.get(tag)
            if column is None:
                column = [None] * len(self.steps)
                self.columns[tag] = column
            column[row] = value
        self.dirty = True

    def rows(self) -> Iterable[tuple[int, int, dict[str, float]]]:
        """(step, tokens, {tag: value} of the tags logged at that step) per row."""
        for row, step in enumerate(self.steps):
            values = {tag: col[row] for tag, col in self.columns.items() if col[row] is not None}
            yield step, self.tokens[row], values

    def table(self, tag_order: Iterable[str]) -> pa.Table:
        """The rows as a table sorted by step; tag columns in tag_order (those it has)."""
        arrays = [pa.array(self.steps, pa.int64()), pa.array(self.tokens, pa.int64())]
        names = list(RESERVED_COLUMNS)
        for tag in tag_order:
            column = self.columns.get(tag)
            if column is not None:
                # from_pandas stays False so NaN is stored as a value, not turned into null.
                arrays.append(pa.array(column, pa.float64()))
                names.append(tag)
        table = pa.Table.from_arrays(arrays, names=names)
        if any(a > b for a, b in zip(self.steps, self.steps[1:])):
            table = table.sort_by("step")
        return table


class ParquetSink:
    """The Parquet metrics table of one run directory, written as parts (writing rank only).

    The table is a directory of Parquet parts (see `tti_dist.metrics.metrics_table`). A flush writes
    the schema part if a tag is new, the parts sealed since the last flush, and the tail
    part: at most a few files of at most ~`rows_per_part` rows each, whatever the length
    of the run. The only writes that depend on the run length are rare: logging a step
    that an already written, sealed part covers (going back in steps) rewrites that part
    after reading the step ranges of the parts on disk, and `resume_step` reads the parts
    after the resume step (once, at open).

    Args:
        run_dir: run directory (it exists); the table is `run_dir/metrics.parquet/`.
        resume_step: the step of the checkpoint this run resumes from. Rows after it (left
            by the crashed run) are discarded. None means a fresh run: the table already in
            the run directory is discarded.
        rows_per_part: rows (steps) after which the tail part is sealed and a new one
            begins; bounds the rows one flush rewrites and the rows held in memory.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None, rows_per_part: int) -> None:
        self.run_dir = run_dir
        self.rows_per_part = rows_per_part
        self.resume_step = resume_step
        self._table_dir = metrics_path(self.run_dir)
        # Every tag ever seen, in first-seen order (the schema part's columns).
        self._tags: dict[str, None] = {}
        # Whether the schema part on disk lacks some of self._tags or does not exist yet
        # (set False when a resumed table has one).
        self._schema_dirty = True
        # Parts held in memory, in step order: parts sealed since the last flush, then the
        # tail. Part i covers the steps above part i-1's max_step, up to its own max_step.
        self._held: list[_Part] = [_Part(1)]
        # Largest step of the parts on disk that are no longer held; a log at or below it
        # goes to self._backfill and is merged into its part file at the next flush.
        self._sealed_max_step: int | None = None
        self._backfill = _Part(0)
        self._open_table()

    # ------------------------------------------------------------------ setup

    def _open_table(self) -> None:
        """Clear leftovers of an interrupted writer, then discard the table (fresh run) or
        cut it back to resume_step (resume), converting a single-file table if needed."""
        path = self._table_dir
        self._recover_leftovers()
        if self.resume_step is None:
            if path.is_dir():
                logger.info("fresh run: discarding existing metrics table %s", path)
                _remove_tree(path)
            elif path.exists():
                logger.info("fresh run: discarding existing metrics file %s", path)
                path.unlink()
            return
        if path.is_file():
            self._convert_single_file(path)
        if path.is_dir():
            self._truncate_and_load(path)

    def _recover_leftovers(self) -> None:
        """Undo or finish what a writer killed while replacing the whole table left behind."""
        path = self._table_dir
        backup = self.run_dir / _LEGACY_BACKUP
        if backup.exists():
            if path.exists():
                # Killed after the converted directory was moved into place.
                backup.unlink()
            else:
                # Killed between moving the old file aside and moving the new directory
                # in: the old file is still the whole truth.
                os.replace(backup, path)
        for entry in self.run_dir.iterdir():
            if entry.name == _STAGING_DIR or entry.name.startswith(_DISCARD_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
        if path.is_dir():
            for entry in path.iterdir():
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    entry.unlink()  # a part being written when the writer died

    def _convert_single_file(self, path: Path) -> None:
        """Resume a run whose table is one Parquet file (the format before parts): write
        its rows up to resume_step as parts in a hidden directory, then swap it in.

        The swap is two renames (a directory cannot atomically replace a file); a crash
        between them leaves the old file under _LEGACY_BACKUP, restored at the next open.
        """
        table = pq.read_table(path)
        total = table.num_rows
        table = table.filter(pc.less_equal(table["step"], self.resume_step)).sort_by("step")
        logger.info(
            "resuming metrics from single-file table %s at step %d: kept %d of %d rows, "
            "converting to parts",
            path,
            self.resume_step,
            table.num_rows,
            total,
        )
        tags = [name for name in table.column_names if name not in RESERVED_COLUMNS]
        columns = [
            table[name].cast(pa.int64() if name in RESERVED_COLUMNS else pa.float64())
            for name in table.column_names
        ]
        table = pa.Table.from_arrays(columns, names=table.column_names)
        staging = self.run_dir / _STAGING_DIR
        staging.mkdir()
        pq.write_table(table_schema(tags).empty_table(), staging / SCHEMA_PART)
        for i, start in enumerate(range(0, table.num_rows, self.rows_per_part)):
            pq.write_table(table.slice(start, self.rows_per_part), staging / part_name(i + 1))
        backup = self.run_dir / _LEGACY_BACKUP
        os.replace(path, backup)
        os.rename(staging, path)
        backup.unlink()

    def _truncate_and_load(self, path: Path) -> None:
        """Drop the rows after resume_step from a parts directory and hold its last part
        in memory as the tail if it has room."""
        schema_file = path / SCHEMA_PART
        if schema_file.is_file():
            names = pq.read_schema(schema_file).names
            self._schema_dirty = False
        else:
            # Not written by this module, or by a version that did not write one; rebuild
            # it from the parts' own schemas (in part order, i.e. first-seen order).
            names = []
            for _, part_file in part_files(path):
                names += [n for n in pq.read_schema(part_file).names if n not in names]
        self._tags = {name: None for name in names if name not in RESERVED_COLUMNS}

        parts = part_files(path)
        total_dropped = 0
        # Walk back from the last part: delete those wholly after resume_step, rewrite the
        # one that straddles it. Deleting last-first keeps the table a prefix of the run
        # if this is interrupted, and a repeat of the resume finishes the job.
        while parts:
            index, part_file = parts[-1]
            step_range = part_step_range(part_file)
            if step_range is not None and step_range[0] > self.resume_step:
                total_dropped += pq.read_metadata(part_file).num_rows
                part_file.unlink()
                parts.pop()
                continue
            if step_range is not None and step_range[1] > self.resume_step:
                table = pq.read_table(part_file)
                kept = table.filter(pc.less_equal(table["step"], self.resume_step))
                total_dropped += table.num_rows - kept.num_rows
                _write_atomically(kept, part_file)
            break
        logger.info(
            "resuming metrics from %s at step %d: dropped %d rows after it",
            path,
            self.resume_step,
            total_dropped,
        )
        if not parts:
            return  # the held tail stays the empty part 1
        index, part_file = parts[-1]
        last = _Part.from_table(index, pq.read_table(part_file))
        if len(last) < self.rows_per_part:
            self._held = [last]  # keep filling it
            earlier = parts[:-1]
        else:
            self._held = [_Part(index + 1)]
            earlier = parts
        # The sealed parts' largest step: that of the last non-empty part not held.
        for _, part_file in reversed(earlier):
            step_range = part_step_range(part_file)
            if step_range is not None:
                self._sealed_max_step = step_range[1]
                break

    # ------------------------------------------------------------------ logging

    def record(self, step: int, tokens: int, values: dict[str, float]) -> None:
        """Merge one log call into the part whose step range holds the step."""
        for tag in values:
            if tag not in self._tags:
                self._tags[tag] = None
                self._schema_dirty = True
        if self._sealed_max_step is not None and step <= self._sealed_max_step:
            self._backfill.merge(step, tokens, values)  # rare: going back in steps
            return
        for part in self._held[:-1]:
            if step <= part.max_step:
                part.merge(step, tokens, values)
                return
        tail = self._held[-1]
        if len(tail) >= self.rows_per_part and step > tail.max_step:
            # Seal the full tail; it is written (if it changed) at the next flush. Sealing
            # only on a step above all of its rows keeps the common case of a second log
            # at the latest step (an eval after a flush) inside the held parts.
            tail = _Part(tail.index + 1)
            self._held.append(tail)
        tail.merge(step, tokens, values)

    # ------------------------------------------------------------------ output

    def write(self) -> None:
        """Write the schema part (if a tag is new), backfilled parts and the held parts
        that changed, in that order, each atomically; then drop the sealed held parts."""
        if not (self._backfill.steps or any(part.dirty for part in self._held)):
            return
        creating = not self._table_dir.is_dir()
        out_dir = self.run_dir / _STAGING_DIR if creating else self._table_dir
        if creating:
            # The first flush builds the directory under a hidden name and renames it into
            # place: metrics.parquet appears with its schema part and first rows, never
            # empty (an empty directory reads as a table without even a `step` column).
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir()
        if self._schema_dirty:
            # Before any data part that has a new column: a reader that lists the
            # directory in between must not see a column the schema part lacks.
            _write_atomically(table_schema(self._tags).empty_table(), out_dir / SCHEMA_PART)
            self._schema_dirty = False
        if self._backfill.steps:
            self._write_backfill()
        for part in self._held:
            if part.dirty:
                _write_atomically(part.table(self._tags), out_dir / part_name(part.index))
                part.dirty = False
        if creating:
            os.rename(out_dir, self._table_dir)
        if len(self._held) > 1:
            self._sealed_max_step = self._held[-2].max_step
            self._held = self._held[-1:]

    def _write_backfill(self) -> None:
        """Merge the rows logged at steps that sealed parts on disk cover into those parts.

        Reads the step range of every part on disk (the one cost here that grows with the
        run), so it is kept out of the normal path: only steps at or below the sealed
        parts' largest step come here.
        """
        held_from = self._held[0].index
        on_disk = [(i, f) for i, f in part_files(self._table_dir) if i < held_from]
        assert on_disk, "a step below the sealed parts' range, but no sealed part on disk"
        firsts = []
        for index, part_file in on_disk:
            step_range = part_step_range(part_file)
            firsts.append(step_range[0] if step_range else None)
        # Each step goes to the last part whose first step is at or below it (the first
        # part for steps below every part): the parts' step ranges stay disjoint and ordered.
        targets: dict[int, _Part] = {}
        for step, tokens, values in self._backfill.rows():
            k = 0
            for j, first in enumerate(firsts):
                if first is not None and first <= step:
                    k = j
            index, part_file = on_disk[k]
            if index not in targets:
                targets[index] = _Part.from_table(index, pq.read_table(part_file))
            targets[index].merge(step, tokens, values)
        for index, part in targets.items():
            _write_atomically(part.table(self._tags), self._table_dir / part_name(index))
        self._backfill = _Part(0)
