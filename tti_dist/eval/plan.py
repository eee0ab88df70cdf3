"""A `tti eval` job, checked before any process starts: `prepare_eval` -> `EvalPlan`.

Everything a user can get wrong (run directory, checkpoint, --weights file, datasets,
options) is a one-line ConfigError here; the ranks then read the plan
(tti_dist.eval.evaluate.run_eval). Light on purpose: no model code is imported.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from tti_dist.config.schema import ModelConfig, RunConfig
from tti_dist.config.sections import section_from_dict
from tti_dist.data.dataset_reader import open_dataset
from tti_dist.errors import ConfigError
from tti_dist.rundir import RunDir, tag_step

DEFAULT_MAX_TOKENS = 4096
DEFAULT_PROBE_SITES = ("blocks.*.resid_post",)
DEFAULT_UNIT_SITES = ("blocks.*.mlp.act",)


@dataclass(frozen=True)
class EvalPlan:
    """A validated `tti eval` job (built by prepare_eval, read by every rank)."""

    run_dir: str
    """The trained run's directory."""
    cfg: RunConfig
    """The run's resolved config (RUN/config.yaml)."""
    ckpt_dir: str
    """RUN/checkpoints."""
    tag: str
    """Checkpoint tag evaluated (global_step<N>), or the weights file's name."""
    step: int
    """Optimizer step of the checkpoint (the TensorBoard step); -1 for --weights."""
    datasets: tuple[tuple[str, str], ...]
    """(name, dataset directory): 'val' for the run's own data first, then each --data."""
    weights: str | None
    """An exported safetensors file to evaluate instead of a checkpoint (TP=1)."""
    nproc: int
    """Ranks = tensor-parallel degree of the evaluation."""
    batches: int
    """Validation micro-batches per dataset."""
    max_tokens: int
    """Tokens whose activations are kept for the interpretability metrics."""
    probe_sites: tuple[str, ...] = DEFAULT_PROBE_SITES
    """Hookpoint globs for the linear / sparse probes."""
    unit_sites: tuple[str, ...] = DEFAULT_UNIT_SITES
    """Hookpoint globs for MIG and per-unit monosemanticity."""
    out_dir: str = ""
    """RUN/eval."""

    @property
    def out_name(self) -> str:
        """Output file stem: the checkpoint's step (RUN/eval/<STEP>.parquet), or the weights
        file's stem for --weights."""
        return str(self.step) if self.weights is None else self.tag


def prepare_eval(run_dir: str | Path, checkpoint: str | None = None, data: list[str] | None = None,
                 weights: str | None = None, nproc: int | None = None, batches: int | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> EvalPlan:
    """Validate everything before any process starts; raise a one-line ConfigError on a user error.

    `batches` defaults to train.eval_batches x dp_size: at DP=1 those are exactly the windows
    the trainer's eval read (every DP rank's slice of its first eval_batches global
    micro-steps), so `eval/loss` of the final checkpoint reproduces the logged one."""
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    cfg = run.load_config()
    tag = run.resolve_checkpoint(checkpoint) if weights is None else "weights"
    ckpt_dir = run.checkpoints
    if batches is None:
        batches = cfg.train.eval_batches * cfg.parallel.dp_size
    if batches < 1:
        raise ConfigError(f"--batches: {batches} must be >= 1")
    if max_tokens < 16:
        raise ConfigError(f"--max-tokens: {max_tokens} must be >= 16")
    if weights is not None:
        if not Path(weights).is_file():
            raise ConfigError(f"--weights: '{weights}' does not exist")
        _check_weights_model(weights, cfg)
        if nproc not in (None, 1):
            raise ConfigError(f"--nproc: {nproc} is not allowed with --weights (an exported model is evaluated on 1 rank)")
        nproc = 1
    else:
        nproc = cfg.parallel.tp_size if nproc is None else nproc
        if nproc != cfg.parallel.tp_size:
            raise ConfigError(f"--nproc: {nproc} must equal the run's parallel.tp_size {cfg.parallel.tp_size} "
                              "(export the run and use --weights to evaluate at TP=1)")
    if cfg.data.path is None:
        raise ConfigError(f"RUN: '{run_dir}/config.yaml' has no data.path; was it written by tti train?")
    datasets = [("val", cfg.data.path)] + [(Path(p).name, p) for p in (data or [])]
    names = [n for n, _ in datasets]
    if len(set(names)) != len(names):
        raise ConfigError(f"--data: dataset names must be unique (directory names), got {names}")
    for name, path in datasets:
        where = "--data" if name != "val" else "data.path"
        if not (Path(path) / "manifest.json").is_file():
            raise ConfigError(f"{where}: '{path}' is not a dataset directory (no manifest.json)")
        ds = open_dataset(path, verify=False)
        if "val" not in ds.splits:
            raise ConfigError(f"{where}: '{path}' has no val split")
        if ds.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"{where}: '{path}' has a vocabulary of {ds.vocab_size} tokens, more than the "
                              f"model's model.vocab_size {cfg.model.vocab_size}")
        if ds.num_tokens("val") < cfg.train.micro_batch_size * (cfg.data.seq_len + 1):
            raise ConfigError(f"{where}: '{path}' val split has fewer tokens than one micro-batch "
                              f"({cfg.train.micro_batch_size} x {cfg.data.seq_len + 1})")
    step = tag_step(tag) if weights is None else -1
    return EvalPlan(run_dir=str(run_dir), cfg=cfg, ckpt_dir=str(ckpt_dir), tag=tag if weights is None else Path(weights).stem,
                    step=step if step is not None else -1, datasets=tuple(datasets), weights=weights, nproc=nproc,
                    batches=batches, max_tokens=max_tokens, out_dir=str(run.eval))


def _check_weights_model(weights: str, cfg: RunConfig) -> None:
    """ConfigError unless `weights` is a `tti export` file of the run's model (metadata only)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for non-safetensors files
        raise ConfigError(f"--weights: '{weights}' is not a safetensors file ({str(exc).splitlines()[0]})") from None
    if meta.get("format") != "tti_dist.gpt" or "model_config" not in meta:
        raise ConfigError(f"--weights: '{weights}' was not written by tti export (no tti_dist.gpt metadata)")
    model_cfg = section_from_dict(ModelConfig, json.loads(meta["model_config"]), "model.")
    if dataclasses.asdict(model_cfg) != dataclasses.asdict(cfg.model):
        raise ConfigError(f"--weights: '{weights}' holds a different model than RUN/config.yaml")
