"""The TensorBoard sink of the metrics writer: event files under `run_dir/tb/`, for watching
a run live.

Restarts must not leave stale events behind. A run that resumes from the checkpoint at
step 30 tells TensorBoard to discard its events after step 30 through its own mechanism
(`purge_step`, a SessionLog.START event that the event reader applies when it reaches the
new file). Opening without `resume_step` starts a fresh run: old TensorBoard events are
purged the same way (from step 0), as the Parquet table is discarded.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping

from tensorboard.compat.proto.summary_pb2 import Summary
# At module level: every rank imports it anyway (megatron.core's timers do), so importing it
# only on the writing rank would save nothing.
from torch.utils.tensorboard import SummaryWriter

from tti_dist.errors import RunWriteError, os_reason
from tti_dist.rundir import TENSORBOARD_DIR

logger = logging.getLogger(__name__)

TB_DIRNAME = TENSORBOARD_DIR
"""Sub-directory of the run directory holding TensorBoard event files."""

_EVENT_FILE_PREFIX = "events.out.tfevents."
# How far in the future an existing event file's timestamp may be before we stop waiting
# for the clock to pass it (clock skew between nodes); see _wait_for_later_event_filename.
_MAX_CLOCK_WAIT_S = 2.0


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


class TensorBoardSink:
    """TensorBoard event files of one run directory, opened with the purge a restart needs.

    Args:
        run_dir: run directory; events go to `run_dir/tb/`.
        resume_step: the step of the checkpoint this run resumes from (events after it are
            purged); None for a fresh run (every existing event is purged).
    """

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        self.run_dir = run_dir
        self.resume_step = resume_step
        self._writer = self._open()

    def _open(self) -> SummaryWriter:
        """Open the SummaryWriter, purging events a restart (or a fresh run) makes stale."""
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

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Write the scalars of one `MetricsWriter.log` call at `step` (none: nothing)."""
        if not values:
            return
        # One event holding every scalar of the call, exactly what add_scalar writes per
        # tag (a simple_value per tag) but built once: 30 add_scalar calls cost ~2 ms of
        # rank-0 CPU per logged step, this ~0.25 ms. TensorBoard's reader splits the
        # values back into per-tag series. The file writer is SummaryWriter's own (it
        # carries the purge_step of a resumed run).
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
        self._writer._get_file_writer().add_summary(summary, step)

    def flush(self) -> None:
        """Flush the event file; a failed write is a one-line RunWriteError."""
        try:
            self._writer.flush()
        except OSError as exc:
            raise RunWriteError(f"{self.run_dir / TB_DIRNAME}: could not write TensorBoard events: "
                                f"{os_reason(exc)}") from exc

    def close(self) -> None:
        """Close the event file."""
        self._writer.close()
