"""Metric sinks of the writing rank: TensorBoard event files, a Parquet table and (optionally) W&B.

Only global rank 0 writes metrics; every other rank gets a `NullMetricsWriter` so the
training loop can call the same methods everywhere (`open_metrics_writer`). Each `log`
call sends its scalars to two places under the run directory, with the same tag names
(`train/task_loss`, `eval/loss`, ...):

- `run_dir/tb/`: TensorBoard event files, for watching a run live;
- `run_dir/metrics.parquet`: one row per step (`step`, `tokens`, one float64 column per
  tag in first-seen order, null where a tag was not logged at that step), for analysis
  with pandas/pyarrow without parsing event files. Read it as one table with
  `pq.read_table(path)`, `pd.read_parquet(path)` or `read_metrics(run_dir)`;
- with `logging.wandb`, a Weights & Biases run (files under `run_dir/wandb/`): the same
  tags at the same steps, and `tokens`.

The table's format and its reader are `tti_dist.metrics.metrics_table`; the two sinks are
`tti_dist.metrics.parquet_sink` and `tti_dist.metrics.tensorboard_sink`; W&B's is
`tti_dist.metrics.wandb_sink`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

from tti_dist.config.schema import WandbConfig
from tti_dist.metrics.metrics_table import RESERVED_COLUMNS
from tti_dist.metrics.parquet_sink import DEFAULT_ROWS_PER_PART, ParquetSink
from tti_dist.metrics.tensorboard_sink import TensorBoardSink
from tti_dist.metrics.wandb_sink import WandbSink


def _to_float(tag: str, value: Any) -> float:
    """Convert a python/numpy/0-d tensor scalar to float, naming the tag if it is not one."""
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"metric {tag!r}: value {value!r} of type {type(value).__name__} is not a scalar"
        ) from exc


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

    The table is a directory of Parquet parts (`tti_dist.metrics.metrics_table`), written
    by `ParquetSink` (tti_dist.metrics.parquet_sink: what a flush writes, and why its cost
    does not grow with the run's length).

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
        wandb: the config's `logging.wandb` section: also log to a W&B run (none for None
            or mode disabled).
        run_config: the resolved run config as a plain mapping (the W&B run's config).
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
        wandb: WandbConfig | None = None,
        run_config: Mapping[str, Any] | None = None,
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
        self._closed = False
        self._logs_since_flush = 0

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._table = (
            ParquetSink(self.run_dir, resume_step=resume_step, rows_per_part=rows_per_part) if parquet else None
        )
        self._tb = TensorBoardSink(self.run_dir, resume_step) if tensorboard else None
        self._wandb = (WandbSink(self.run_dir, wandb, resume_step, run_config)
                       if wandb is not None and wandb.mode != "disabled" else None)

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
            if tag in RESERVED_COLUMNS:
                raise ValueError(f"metric tag {tag!r} collides with a reserved column")
            values[tag] = _to_float(tag, value)

        if self._table is not None:
            self._table.record(step, tokens, values)
        if self._tb is not None:
            self._tb.log(step, values)
        if self._wandb is not None:
            self._wandb.log(step, tokens, values)

        self._logs_since_flush += 1
        if self._logs_since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the changed Parquet parts atomically and flush TensorBoard."""
        if self._closed:
            return
        self._logs_since_flush = 0
        if self._table is not None:
            self._table.write()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the sinks; later calls do nothing.

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
        if self._wandb is not None:
            # The trainer closes the writer in a `finally`: an exception on its way up (a
            # failed run) is the one being handled here.
            self._wandb.close(failed=sys.exc_info()[0] is not None)
            self._wandb = None


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
