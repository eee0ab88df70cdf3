"""Metric sinks of the writing rank: TensorBoard event files and a Parquet table.

Only global rank 0 writes metrics; every other rank gets a `NullMetricsWriter` so the
training loop can call the same methods everywhere (`open_metrics_writer`). Each `log`
call sends its scalars to two places under the run directory, with the same tag names
(`train/task_loss`, `eval/loss`, ...):

- `run_dir/tb/`: TensorBoard event files, for watching a run live;
- `run_dir/metrics.parquet`: one row per step (`step`, `tokens`, one float64 column per
  tag, null where a tag was not logged at that step), for analysis with pandas/pyarrow
  without parsing event files.

Restarts must not leave duplicate or stale data behind. A run that crashed after step 37
and resumes from the checkpoint at step 30 opens the writer with `resume_step=30`: the
Parquet rows after step 30 are dropped, and TensorBoard is told to discard its events
after step 30 through its own mechanism (`purge_step`, a SessionLog.START event that the
event reader applies when it reaches the new file). Opening without `resume_step` starts a
fresh run: old Parquet rows are discarded and old TensorBoard events are purged the same
way (from step 0).

The Parquet file is rewritten whole on every flush (it is small: one row per step) and
replaced atomically, so a crash mid-write never leaves a truncated table.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

PARQUET_NAME = "metrics.parquet"
"""File name of the metrics table inside the run directory."""
TB_DIRNAME = "tb"
"""Sub-directory of the run directory holding TensorBoard event files."""

_RESERVED_COLUMNS = ("step", "tokens")
_EVENT_FILE_PREFIX = "events.out.tfevents."
# How far in the future an existing event file's timestamp may be before we stop waiting
# for the clock to pass it (clock skew between nodes); see _wait_for_later_event_filename.
_MAX_CLOCK_WAIT_S = 2.0


def metrics_path(run_dir: str | Path) -> Path:
    """Path of the Parquet metrics table of a run directory."""
    return Path(run_dir) / PARQUET_NAME


def read_metrics(run_dir: str | Path) -> pa.Table:
    """Read the Parquet metrics table of a run directory (for tests and analysis tools).

    Raises FileNotFoundError if the run has not flushed any metrics yet.
    """
    return pq.read_table(metrics_path(run_dir))


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

    Args:
        run_dir: run directory; TensorBoard writes to `run_dir/tb/`, Parquet to
            `run_dir/metrics.parquet`.
        tensorboard: write TensorBoard event files.
        parquet: write the Parquet table.
        resume_step: the step of the checkpoint this run resumes from. Rows and events
            after it (left by the crashed run) are discarded. None means a fresh run:
            everything already in the run directory's metrics is discarded.
        flush_every: write the Parquet file and flush TensorBoard every this many `log`
            calls (and on `close`).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = True,
        parquet: bool = True,
        resume_step: int | None = None,
        flush_every: int = 20,
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        if resume_step is not None and resume_step < 0:
            raise ValueError(f"resume_step must be >= 0 or None, got {resume_step}")
        self.run_dir = Path(run_dir)
        self.flush_every = flush_every
        self.resume_step = resume_step
        self._parquet = parquet
        self._closed = False
        self._logs_since_flush = 0
        # Column-wise storage: rewriting the table on each flush then needs no pivoting.
        self._steps: list[int] = []
        self._tokens: list[int] = []
        self._columns: dict[str, list[float | None]] = {}
        self._row_of_step: dict[int, int] = {}

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if parquet:
            self._load_existing_rows()
        self._tb = self._open_tensorboard() if tensorboard else None

    # ------------------------------------------------------------------ setup

    def _load_existing_rows(self) -> None:
        """On resume, keep the rows up to resume_step of an existing table; else start empty."""
        path = metrics_path(self.run_dir)
        if not path.exists():
            return
        if self.resume_step is None:
            logger.info("fresh run: overwriting existing metrics table %s", path)
            return
        table = pq.read_table(path)
        total = table.num_rows
        table = table.filter(pc.less_equal(table["step"], self.resume_step))
        logger.info(
            "resuming metrics from %s at step %d: kept %d of %d rows",
            path,
            self.resume_step,
            table.num_rows,
            total,
        )
        self._steps = [int(s) for s in table["step"].to_pylist()]
        self._tokens = [int(t) for t in table["tokens"].to_pylist()]
        for name in table.column_names:
            if name not in _RESERVED_COLUMNS:
                column = table[name].cast(pa.float64()).to_pylist()
                self._columns[name] = column
        self._row_of_step = {step: i for i, step in enumerate(self._steps)}

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
            # table is overwritten, so the two sinks never disagree.
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
        if self._tb is not None:
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, global_step=step)

        self._logs_since_flush += 1
        if self._logs_since_flush >= self.flush_every:
            self.flush()

    def _record(self, step: int, tokens: int, values: dict[str, float]) -> None:
        """Merge one log call into the in-memory table."""
        row = self._row_of_step.get(step)
        if row is None:
            row = len(self._steps)
            self._row_of_step[step] = row
            self._steps.append(step)
            self._tokens.append(tokens)
            for column in self._columns.values():
                column.append(None)
        else:
            self._tokens[row] = tokens
        for tag, value in values.items():
            column = self._columns.get(tag)
            if column is None:
                column = [None] * len(self._steps)
                self._columns[tag] = column
            column[row] = value

    def _table(self) -> pa.Table:
        """The in-memory rows as a table sorted by step."""
        arrays = [pa.array(self._steps, pa.int64()), pa.array(self._tokens, pa.int64())]
        names = list(_RESERVED_COLUMNS)
        for tag, column in self._columns.items():
            # from_pandas stays False so NaN is stored as a value, not turned into null.
            arrays.append(pa.array(column, pa.float64()))
            names.append(tag)
        table = pa.Table.from_arrays(arrays, names=names)
        if any(a > b for a, b in zip(self._steps, self._steps[1:])):
            table = table.sort_by("step")
        return table

    # ------------------------------------------------------------------ output

    def flush(self) -> None:
        """Write the Parquet table atomically and flush TensorBoard."""
        if self._closed:
            return
        self._logs_since_flush = 0
        if self._parquet:
            path = metrics_path(self.run_dir)
            tmp = path.with_name(path.name + ".tmp")
            pq.write_table(self._table(), tmp)
            # Atomic on POSIX within one directory: readers see the old or new file, whole.
            os.replace(tmp, path)
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close both sinks; later calls do nothing."""
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
