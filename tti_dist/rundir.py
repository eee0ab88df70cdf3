"""The run directory: every path in it, the checkpoint tags, and the checks on it.

    RUN/
      config.yaml               the resolved config (what resume and eval read back)
      deepspeed_config.json     the DeepSpeed config the engine ran with
      metrics.parquet/          the metrics table (tti_dist.metrics)
      tb/                       TensorBoard event files
      dataset/                  the dataset built from data.source (when data.path was null)
      checkpoints/
        latest                  the tag to resume from (DeepSpeed's convention)
        global_step<N>/         a complete checkpoint: DeepSpeed's files
                                (mp_rank_XX_model_states.pt, *_optim_states.pt,
                                layer_<L>_expert_<E>_mp_rank_XX_model_states.pt for MoE),
                                rng_rank<R>.json, tp_layout.json
      eval/                     tti eval's outputs
      sae_fit/                  tti sae fit's outputs

This module is the only one that knows these names, DeepSpeed's checkpoint file names
included; it imports no model code, so commands check a run directory before megatron-core
loads. How a checkpoint is written atomically is tti_dist.train.checkpoint's job.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from tti_dist.config import config_from_dict, config_to_dict
from tti_dist.config.schema import RunConfig
from tti_dist.distributed.zero_config import engine_zero_stage
from tti_dist.errors import ConfigError
from tti_dist.utils.safe_load import DEEPSPEED_GLOBALS, load_torch_file

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"
METRICS_NAME = "metrics.parquet"
TENSORBOARD_DIR = "tb"
DATASET_DIR = "dataset"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
TP_LAYOUT_FILE = "tp_layout.json"
EVAL_DIR = "eval"
SAE_FIT_DIR = "sae_fit"

_TAG_RE = re.compile(r"^global_step(\d+)$")
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
"""DeepSpeed's per-expert checkpoint files (MoE): layer_<moe layer>_expert_<global id>_mp_rank_<tp>."""


def checkpoint_tag(step: int) -> str:
    """DeepSpeed's tag naming: global_step<N>."""
    return f"global_step{step}"


def tag_step(tag: str) -> int | None:
    """The step of a complete-checkpoint tag, None for anything else."""
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag named by `latest`, if it names an existing complete checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST_FILE
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if tag_step(tag) is None or not (ckpt_dir / tag).is_dir():
        logger.warning("%s names %r, which is not a complete checkpoint; ignoring it", latest, tag)
        return None
    return tag


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and tag_step(p.name) is not None]
    return sorted(tags, key=lambda t: tag_step(t))


def rng_file_name(rank: int) -> str:
    """The per-rank RNG state file of a checkpoint directory."""
    return f"rng_rank{rank:05d}.json"


def model_states_file(tp_rank: int) -> str:
    """DeepSpeed's file of one model-parallel (TP) rank's non-expert module weights."""
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def tp_rank_file_pattern(tp_rank: int) -> re.Pattern:
    """Matches the model-parallel rank part (`mp_rank_XX`) of TP rank `tp_rank`'s file names."""
    return re.compile(rf"mp_rank_{tp_rank:02d}(?=_|\.)")


def check_checkpoint_files(tag_dir: Path) -> None:
    """RefusedFileError (one line) unless every DeepSpeed model, expert and optimizer state
    file of the checkpoint loads with the weights-only unpickler and tti's allowlist.

    Memory-mapped: the tensors are not read. The RNG files are not checked here: only
    `tti train --resume` reads them, and they are JSON.
    """
    for f in sorted(tag_dir.glob("*_states.pt")):
        load_torch_file(f, DEEPSPEED_GLOBALS, mmap=True)


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def deepspeed_config_file(self) -> Path:
        return self.root / DEEPSPEED_CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_NAME

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def dataset(self) -> Path:
        return self.root / DATASET_DIR

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def eval(self) -> Path:
        return self.root / EVAL_DIR

    @property
    def sae_fit(self) -> Path:
        return self.root / SAE_FIT_DIR

    def latest_tag(self) -> str | None:
        """The checkpoint tag to resume from, if a complete one exists."""
        return latest_tag(self.checkpoints)

    def load_config(self) -> RunConfig:
        """The run's resolved config; ConfigError when this is not a run directory."""
        if not self.config_file.is_file():
            raise ConfigError(f"RUN: '{self.root}' is not a tti run directory (no config.yaml)")
        return config_from_dict(yaml.safe_load(self.config_file.read_text()))

    def resolve_checkpoint(self, checkpoint: str | None) -> str:
        """The tag of `checkpoint` (None: the latest; a step; or a tag), its files checked
        loadable; a one-line ConfigError otherwise."""
        if checkpoint is None:
            tag = self.latest_tag()
            if tag is None:
                raise ConfigError(f"RUN: '{self.root}' holds no complete checkpoint")
        else:
            tag = checkpoint_tag(int(checkpoint)) if str(checkpoint).isdigit() else str(checkpoint)
            if not (self.checkpoints / tag).is_dir():
                available = ", ".join(complete_tags(self.checkpoints)) or "none"
                raise ConfigError(f"--checkpoint: {checkpoint!r} not found in {self.checkpoints}; available: {available}")
        check_checkpoint_files(self.checkpoints / tag)
        return tag

    def check_resume_compatible(self, cfg: RunConfig) -> None:
        """The model, layout and ZeRO stage must match the checkpointed run's (ConfigError)."""
        if not self.config_file.is_file():
            return
        saved = config_from_dict(yaml.safe_load(self.config_file.read_text()))
        for section in ("model", "parallel"):
            old, new = config_to_dict(getattr(saved, section)), config_to_dict(getattr(cfg, section))
            for key in old:
                if old[key] != new[key]:
                    raise ConfigError(f"{section}.{key}: {new[key]!r} differs from the checkpointed run's "
                                      f"{old[key]!r}; resume needs the same value")
        if saved.zero.stage != cfg.zero.stage:
            raise ConfigError(f"zero.stage: {cfg.zero.stage} differs from the checkpointed run's "
                              f"{saved.zero.stage}; resume needs the same value")
        # The checkpoint files follow the stage DeepSpeed ran, recorded next to them; a run
        # from before stages 1-2 ran as stage 0 at dp_size 1 cannot be read by this engine.
        if self.deepspeed_config_file.is_file():
            ran = json.loads(self.deepspeed_config_file.read_text()).get("zero_optimization", {}).get("stage")
            if ran is not None and ran != engine_zero_stage(cfg):
                raise ConfigError(
                    f"zero.stage: this run's checkpoints were written by a ZeRO stage-{ran} engine, and zero.stage "
                    f"{cfg.zero.stage} at parallel.dp_size {cfg.parallel.dp_size} runs stage {engine_zero_stage(cfg)}; "
                    "resume is not possible across that change: start a new run (tti export keeps the weights)"
                )

    def resume_hint(self) -> str:
        """Where the latest complete checkpoint is and the command that continues from it."""
        tag = self.latest_tag()
        if tag is None:
            return f"No complete checkpoint in {self.checkpoints}."
        return (f"The latest complete checkpoint is {self.checkpoints / tag}; continue with: "
                f"tti train {self.config_file} --run-dir {self.root} --resume")
