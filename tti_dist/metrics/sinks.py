"""Metric sinks of the writing rank: TensorBoard event files and a Parquet table.

Only global rank 0 writes metrics; every other rank gets a `NullMetricsWriter` so the
training loop can call the same methods everywhere (`open_metrics_writer`). Each `log`
call sends its scalars to two places under the run directory, with the same tag names
(`train/task_loss`, `eval/loss`, ...):

- `run_dir/tb/`: TensorBoard event files, for watching a run live;
- `run_dir/metrics.parquet`: one row per step (`step`, `tokens`, one float64 column per
  tag in first-seen order, null where a tag was not logged at that step), for analysis
  with pandas/pyarrow without parsing event files. Read it as one table with
  `pq.read_table(path)`, `pd.read_parquet(path)` or `read_metrics(run_dir)`.

On-disk format: `metrics.parquet` is a directory of Parquet part files (a Parquet
dataset), so that a flush writes only a bounded amount, whatever the length of the run::

    metrics.parquet/part-00000000-schema.parquet   zero rows; every column, first-seen order
    metrics.parquet/part-00000001.parquet          the first 512 rows (sealed)
    metrics.parquet/part-00000002.parquet          the rows since (the tail, rewritten per flush)

Why: rewriting one whole-run file per flush made the cost of a `log` grow with the row
count (0.38 ms per call at step 2,000, 7.1 ms at step 40,000 with 30 tags), so logging
cost was quadratic in the run length. Now the writer holds only the tail part (at most
`rows_per_part` rows, plus parts sealed since the last flush) and a flush rewrites that
one file; a part that reaches `rows_per_part` rows is sealed when a later step arrives
and is not written again (unless a step it holds is logged again, which the training loop
does not do). The cost of a `log` and the writer's memory are therefore
independent of the run length, and the number of files grows by one per
`rows_per_part` rows.

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
from types import TracebackType
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tensorboard.compat.proto.summary_pb2 import Summary

from tti_dist.errors import RunWriteError

logger = logging.getLogger(__name__)

PARQUET_NAME = "metrics.parquet"
"""Name of the metrics table (a directory of Parquet parts) inside the run directory."""
TB_DIRNAME = "tb"
"""Sub-directory of the run directory holding TensorBoard event files."""

_RESERVED_COLUMNS = ("step", "tokens")
_EVENT_FILE_PREFIX = "events.out.tfevents."
# How far in the future an existing event file's timestamp may be before we stop waiting
# for the clock to pass it (clock skew between nodes); see _wait_for_later_event_filename.
_MAX_CLOCK_WAIT_S = 2.0

# Part files: `part-<8 digits>.parquet`, numbered from 1 in step order. The schema part's
# name sorts before every data part ('-' < '.' after the same 8 digits, and its digits are
# 0), because dataset discovery takes the schema from the first file in path order.
_PART_PREFIX = "part-"
_PART_SUFFIX = ".parquet"
_PART_DIGITS = 8
_SCHEMA_PART = f"{_PART_PREFIX}{0:0{_PART_DIGITS}d}-schema{_PART_SUFFIX}"
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
        schema_part = path / _SCHEMA_PART
        if schema_part.is_file():
            # Name the schema instead of relying on the schema part sorting first: the
            # same columns, without depending on how discovery picks its sample file.
            return pq.read_table(path, schema=pq.read_schema(schema_part))
    return pq.read_table(path)


def _to_float(tag: str, value: Any) -> float:
    """Convert a python/numpy/0-d tensor scalar to float, naming the tag if it is not one."""
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"metric {tag!r}: value {value!r} of type {type(value).__name__} is not a scalar"
        ) from exc


def _event_file_timestamps(tb_dir: Path) -> list[int]:
    """Creation timestamps (whole seconds) encoded in the names of the event files in tb_dir."""
    stamps = []
    if not tb_dir.is_dir():
        return stamps
    for entry in tb_dir.iterdir():
        if not entry.name.startswith(_EVENT_FILE_PREFIX):
            continue
        field = entry.name[len(_EVENT_FILE_PREFIX) :].split(".", 1)[0]
        if field.isdigit():
            stamps.append(int(field))
    return stamps


def _wait_for_later_event_filename(tb_dir: Path) -> None:
    """Wait until a new event file will sort after every existing one in tb_dir.

    TensorBoard reads the event files of a directory in lexicographic name order, and the
    purge of a restart is applied only to events read *before* the START marker. Names are
    `events.out.tfevents.<10-digit seconds>.<host>.<pid>.<counter>`, so two files created
    in the same second are ordered by pid/counter as strings, which is arbitrary (e.g. a
    quick restart, or counter "10" < "9"). Moving to the next second makes the order right.
    """
    stamps = _event_file_timestamps(tb_dir)
    if not stamps:
        return
    newest = max(stamps)
    ahead = newest + 1 - time.time()
    if ahead <= 0:
        return
    if ahead > _MAX_CLOCK_WAIT_S:
        logger.warning(
            "TensorBoard event file in %s is dated %.0f s in the future (clock skew?); "
            "the restart purge may not apply to it",
            tb_dir,
            ahead,
        )
        return
    time.sleep(ahead)
    while time.time() < newest + 1:
        time.sleep(0.01)


# ---------------------------------------------------------------------- part files


def _part_name(index: int) -> str:
    return f"{_PART_PREFIX}{index:0{_PART_DIGITS}d}{_PART_SUFFIX}"


def _part_files(table_dir: Path) -> list[tuple[int, Path]]:
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
        raise RunWriteError(f"{path}: could not write metrics: {_os_reason(exc)}") from exc


def _os_reason(exc: OSError) -> str:
    """'[Errno 28] No space left on device' from an OSError whose text may run on
    (pyarrow's adds 'Error writing bytes to file. Detail: ...')."""
    if exc.errno is not None:
        return f"[Errno {exc.errno}] {os.strerror(exc.errno)}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _step_range(path: Path) -> tuple[int, int] | None:
    """(min, max) step of a part file, None if it has no rows."""
    steps = pq.read_table(path, columns=["step"])["step"]
    if len(steps) == 0:
        return None
    lo_hi = pc.min_max(steps)
    return int(lo_hi["min"].as_py()), int(lo_hi["max"].as_py())


def _table_schema(tags: Iterable[str]) -> pa.Schema:
    """Schema of the metrics table with these tag columns."""
    return pa.schema(
        [pa.field("step", pa.int64()), pa.field("tokens", pa.int64())]
        + [pa.field(tag, pa.float64()) for tag in tags]
    )


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
            if name not in _RESERVED_COLUMNS:
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
        names = list(_RESERVED_COLUMNS)
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


class _ClosableWriter:
    """What both writers share: an idempotent close() and context-manager use."""

    _closed: bool = False

    def close(self) -> None:  # overridden
        self._closed = True

    @property
    def closed(self) -> bool:
        """Whether close() has been called."""
        return self._closed

    def __enter__(self):
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class MetricsWriter(_ClosableWriter):
    """Write scalar metrics to TensorBoard and to a Parquet table (writing rank only).

    One row per step: `log` calls at the same step merge into one row (a later value for
    the same tag, or for `tokens`, replaces the earlier one). Columns are `step` (int64),
    `tokens` (int64), then one float64 column per tag in first-seen order; a tag missing
    at a step is null, while non-finite values (NaN, inf) are kept as values.

    The table is a directory of Parquet parts (see the module docstring). A flush writes
    the schema part if a tag is new, the parts sealed since the last flush, and the tail
    part: at most a few files of at most ~`rows_per_part` rows each, whatever the length
    of the run. The only writes that depend on the run length are rare: logging a step
    that an already written, sealed part covers (going back in steps) rewrites that part
    after reading the step ranges of the parts on disk, and `resume_step` reads the parts
    after the resume step (once, at open).

    A process killed at any point leaves a readable table with every row up to its last
    completed flush; never-closed runs are read like closed ones.

    Args:
        run_dir: run directory; TensorBoard writes to `run_dir/tb/`, Parquet to
            `run_dir/metrics.parquet/`.
        tensorboard: write TensorBoard event files.
        parquet: write the Parquet table.
        resume_step: the step of the checkpoint this run resumes from. Rows and events
            after it (left by the crashed run) are discarded. None means a fresh run:
            everything already in the run directory's metrics is discarded.
        flush_every: write the Parquet parts and flush TensorBoard every this many `log`
            calls (and on `close`).
        rows_per_part: rows (steps) after which the tail part is sealed and a new one
            begins; bounds the rows one flush rewrites and the rows held in memory.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = True,
        parquet: bool = True,
        resume_step: int | None = None,
        flush_every: int = 20,
        rows_per_part: int = DEFAULT_ROWS_PER_PART,
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        if rows_per_part < 1:
            raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
        if resume_step is not None and resume_step < 0:
            raise ValueError(f"resume_step must be >= 0 or None, got {resume_step}")
        self.run_dir = Path(run_dir)
        self.flush_every = flush_every
        self.rows_per_part = rows_per_part
        self.resume_step = resume_step
        self._parquet = parquet
        self._closed = False
        self._logs_since_flush = 0
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

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if parquet:
            self._open_table()
        self._tb = self._open_tensorboard() if tensorboard else None

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
        tags = [name for name in table.column_names if name not in _RESERVED_COLUMNS]
        columns = [
            table[name].cast(pa.int64() if name in _RESERVED_COLUMNS else pa.float64())
            for name in table.column_names
        ]
        table = pa.Table.from_arrays(columns, names=table.column_names)
        staging = self.run_dir / _STAGING_DIR
        staging.mkdir()
        pq.write_table(_table_schema(tags).empty_table(), staging / _SCHEMA_PART)
        for i, start in enumerate(range(0, table.num_rows, self.rows_per_part)):
            pq.write_table(table.slice(start, self.rows_per_part), staging / _part_name(i + 1))
        backup = self.run_dir / _LEGACY_BACKUP
        os.replace(path, backup)
        os.rename(staging, path)
        backup.unlink()

    def _truncate_and_load(self, path: Path) -> None:
        """Drop the rows after resume_step from a parts directory and hold its last part
        in memory as the tail if it has room."""
        schema_file = path / _SCHEMA_PART
        if schema_file.is_file():
            names = pq.read_schema(schema_file).names
            self._schema_dirty = False
        else:
            # Not written by this module, or by a version that did not write one; rebuild
            # it from the parts' own schemas (in part order, i.e. first-seen order).
            names = []
            for _, part_file in _part_files(path):
                names += [n for n in pq.read_schema(part_file).names if n not in names]
        self._tags = {name: None for name in names if name not in _RESERVED_COLUMNS}

        parts = _part_files(path)
        total_dropped = 0
        # Walk back from the last part: delete those wholly after resume_step, rewrite the
        # one that straddles it. Deleting last-first keeps the table a prefix of the run
        # if this is interrupted, and a repeat of the resume finishes the job.
        while parts:
            index, part_file = parts[-1]
            step_range = _step_range(part_file)
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
            step_range = _step_range(part_file)
            if step_range is not None:
                self._sealed_max_step = step_range[1]
                break

    def _open_tensorboard(self) -> Any:
        """Open the SummaryWriter, purging events a restart (or a fresh run) makes stale."""
        # Imported here so that non-writer ranks, which never build one, skip the import.
        from torch.utils.tensorboard import SummaryWriter

        tb_dir = self.run_dir / TB_DIRNAME
        has_old_events = bool(_event_file_timestamps(tb_dir))
        if self.resume_step is not None:
            purge_step: int | None = self.resume_step + 1
        elif has_old_events:
            # A fresh run in a used directory: purge every old event, as the Parquet
            # table is discarded, so the two sinks never disagree.
            purge_step = 0
            logger.info("fresh run: purging existing TensorBoard events in %s", tb_dir)
        else:
            purge_step = None
        if has_old_events:
            _wait_for_later_event_filename(tb_dir)
        return SummaryWriter(log_dir=str(tb_dir), purge_step=purge_step)

    # ------------------------------------------------------------------ logging

    def log(self, step: int, tokens: int, scalars: Mapping[str, Any]) -> None:
        """Record the scalars of one step (merged with earlier calls at the same step).

        Args:
            step: optimizer step.
            tokens: tokens consumed up to and including this step.
            scalars: tag -> value; values may be python/numpy scalars or 0-d tensors.
        """
        if self._closed:
            raise RuntimeError("MetricsWriter.log called after close()")
        step = int(step)
        tokens = int(tokens)
        values = {}
        for tag, value in scalars.items():
            if not isinstance(tag, str) or not tag:
                raise ValueError(f"metric tag must be a non-empty string, got {tag!r}")
            if tag in _RESERVED_COLUMNS:
                raise ValueError(f"metric tag {tag!r} collides with a reserved column")
            values[tag] = _to_float(tag, value)

        if self._parquet:
            self._record(step, tokens, values)
        if self._tb is not None and values:
            # One event holding every scalar of the call, exactly what add_scalar writes per
            # tag (a simple_value per tag) but built once: 30 add_scalar calls cost ~2 ms of
            # rank-0 CPU per logged step, this ~0.25 ms. TensorBoard's reader splits the
            # values back into per-tag series. The file writer is SummaryWriter's own (it
            # carries the purge_step of a resumed run).
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
            self._tb._get_file_writer().add_summary(summary, step)

        self._logs_since_flush += 1
        if self._logs_since_flush >= self.flush_every:
            self.flush()

    def _record(self, step: int, tokens: int, values: dict[str, float]) -> None:
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

    def flush(self) -> None:
        """Write the changed Parquet parts atomically and flush TensorBoard."""
        if self._closed:
            return
        self._logs_since_flush = 0
        if self._parquet:
            self._write_parts()
        if self._tb is not None:
            try:
                self._tb.flush()
            except OSError as exc:
                raise RunWriteError(f"{self.run_dir / TB_DIRNAME}: could not write TensorBoard events: "
                                    f"{_os_reason(exc)}") from exc

    def _write_parts(self) -> None:
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
            _write_atomically(_table_schema(self._tags).empty_table(), out_dir / _SCHEMA_PART)
            self._schema_dirty = False
        if self._backfill.steps:
            self._write_backfill()
        for part in self._held:
            if part.dirty:
                _write_atomically(part.table(self._tags), out_dir / _part_name(part.index))
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
        on_disk = [(i, f) for i, f in _part_files(self._table_dir) if i < held_from]
        assert on_disk, "a step below the sealed parts' range, but no sealed part on disk"
        firsts = []
        for index, part_file in on_disk:
            step_range = _step_range(part_file)
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
            _write_atomically(part.table(self._tags), self._table_dir / _part_name(index))
        self._backfill = _Part(0)

    def close(self) -> None:
        """Flush and close both sinks; later calls do nothing.

        The parts are left as they are (no compaction): a closed run and a crashed one
        have the same layout and are read the same way.
        """
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class NullMetricsWriter(_ClosableWriter):
    """A MetricsWriter that writes nothing, for ranks other than the writing rank."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._closed = False

    def log(self, step: int, tokens: int, scalars: Mapping[str, Any]) -> None:
        """Discard the scalars."""

    def flush(self) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing (but remember that it was closed)."""
        self._closed = True


def open_metrics_writer(
    run_dir: str | Path, *, is_writer_rank: bool, **kwargs: Any
) -> MetricsWriter | NullMetricsWriter:
    """A MetricsWriter on the writing rank (global rank 0), a NullMetricsWriter elsewhere.

    Keyword arguments are those of MetricsWriter.
    """
    if is_writer_rank:
        return MetricsWriter(run_dir, **kwargs)
    return NullMetricsWriter(run_dir, **kwargs)
