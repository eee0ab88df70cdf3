"""The Weights & Biases sink of the metrics writer: the scalars of every `log` call, with the
same tags and steps as TensorBoard and RUN/metrics.parquet, in one W&B run (`logging.wandb`).

The writing rank (the one that writes TensorBoard) opens one W&B run with its files under
RUN/wandb. W&B is an optional dependency: it is imported only when a sink is opened, and
the config check refuses `logging.wandb` (modes online and offline) before any process
starts when the package is missing (config.validate).

Console: W&B's capture of stdout/stderr is off and its banners are silenced, so a run's
console output is tti's own. Offline mode opens no network connection (W&B's error
reporting, which would, is switched off unless WANDB_ERROR_REPORTING is set);
`wandb sync RUN/wandb/offline-run-*` uploads later.

Resume. The W&B run id is kept in RUN/wandb/tti_run_id: a fresh run draws a new id (and
overwrites the file), a resumed run (`tti train --resume`, a Ray Train restart) opens the
same W&B run again (`resume="allow"`). W&B keeps the steps it already has: the steps between
the checkpoint and the crash, logged again by the resumed run, keep their first values online
(W&B drops a step below the run's last one) and appear twice offline (one offline run
directory per attempt, merged by `wandb sync`). Training resumes exactly, so those values
are the same.

Cost: one `run.log` per `MetricsWriter.log` call; W&B serializes the values and hands them
to its own service process, which writes and uploads them asynchronously.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from pathlib import Path
from typing import Any, Mapping

from tti_dist.config.schema import WandbConfig
from tti_dist.utils.atomic_file import write_text_atomic

logger = logging.getLogger(__name__)

WANDB_DIRNAME = "wandb"
"""Sub-directory of the run directory holding W&B's files (W&B names it itself from `dir`)."""

RUN_ID_FILE = "tti_run_id"
"""File in RUN/wandb holding the W&B run id, read back when the run resumes."""

_ID_CHARS = string.ascii_lowercase + string.digits
"""Characters of a W&B run id (8 of them, as W&B draws its own)."""


def wandb_run_id_path(run_dir: str | Path) -> Path:
    """RUN/wandb/tti_run_id."""
    return Path(run_dir) / WANDB_DIRNAME / RUN_ID_FILE


class WandbSink:
    """One W&B run for one run directory (writing rank only).

    Args:
        run_dir: run directory; W&B writes under `run_dir/wandb/`.
        settings: the config's `logging.wandb` section (mode online or offline).
        resume_step: the step of the checkpoint this run resumes from; None for a fresh run.
        run_config: the resolved run config as a plain mapping, recorded as the W&B run's config.
    """

    def __init__(self, run_dir: Path, settings: WandbConfig, resume_step: int | None,
                 run_config: Mapping[str, Any] | None = None) -> None:
        if settings.mode == "offline":
            # W&B's own error reporting would still resolve and contact its server (read when
            # its service process starts); offline means no network. An explicit setting wins.
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        # lazy: wandb is an optional extra (and takes ~1 s to import); only a run that logs to it loads it
        import wandb
        self.run_dir = Path(run_dir)
        (self.run_dir / WANDB_DIRNAME).mkdir(parents=True, exist_ok=True)
        run_id = self._run_id(resume_step)
        self._run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=settings.group,
            name=settings.name or self.run_dir.resolve().name,
            tags=list(settings.tags) or None,
            mode=settings.mode,
            dir=str(self.run_dir),
            id=run_id,
            # A resumed run continues the W&B run of its id; a fresh id starts a new one.
            resume="allow" if resume_step is not None else None,
            config=dict(run_config) if run_config is not None else None,
            # create_new: never hand back (or finish) another run of this process; this
            # sink holds its own run object and does not use wandb.log / wandb.run.
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )
        logger.info("W&B run %s (%s, project %s) in %s", run_id, settings.mode, settings.project,
                    self.run_dir / WANDB_DIRNAME)

    def _run_id(self, resume_step: int | None) -> str:
        """The stored id of a resumed run, else a new one (stored)."""
        path = wandb_run_id_path(self.run_dir)
        if resume_step is not None and path.is_file():
            stored = path.read_text().strip()
            if stored:
                return stored
        # From the OS's generator: the trainer seeds Python's `random`, which would give every
        # run of one seed the same id.
        run_id = "".join(secrets.choice(_ID_CHARS) for _ in range(8))
        write_text_atomic(path, run_id + "\n")
        return run_id

    @property
    def run_id(self) -> str:
        """The W&B run id."""
        return self._run.id

    def log(self, step: int, tokens: int, values: Mapping[str, float]) -> None:
        """Log one `MetricsWriter.log` call: its scalars and `tokens` at `step` (calls at the
        same step merge into one W&B history row)."""
        self._run.log({"tokens": tokens, **values}, step=step)

    def close(self, failed: bool = False) -> None:
        """Finish the W&B run (its service writes and, online, uploads what is left); a
        failed run is finished with exit code 1, which W&B shows as failed."""
        self._run.finish(exit_code=1 if failed else 0)
