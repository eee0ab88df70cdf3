"""A `tti sae fit` job, checked before any process starts: `prepare_fit` -> `FitPlan`.

Everything a user can get wrong (run directory, checkpoint, site, SAE shape, options, data)
is a one-line ConfigError here; the ranks then read the plan (tti_dist.train.sae_fit).
Light on purpose: no model code is imported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from tti_dist.capture.hookpoints import summarize_names
from tti_dist.config.schema import RunConfig
from tti_dist.data.loader import DistributedBatchLoader
from tti_dist.data.prepare import resolve_dataset, run_windows
from tti_dist.errors import ConfigError
from tti_dist.models.layout import gpt_hookpoint_names, hookpoint_width, is_tp_sharded
from tti_dist.rundir import TP_LAYOUT_FILE, RunDir
from tti_dist.config.sae import ACTIVATIONS, K_ACTIVATIONS, SAEConfig

DEFAULT_STEPS = 500
DEFAULT_LR = 1e-3
METRICS_FILE = "sae_metrics.json"


FIT_OPTIONS = ("batchtopk_threshold_lr", "l1_coefficient", "l0_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold",
               "matryoshka_prefixes", "aux_k", "aux_coefficient", "normalize_input", "b_pre_init")
"""SAEConfig fields a fit may set besides num_latents, activation and k (`sae_options`)."""


def shape_tag(num_latents: int, k: int, activation: str = "topk") -> str:
    """n<N>-k<K> for TopK (the names of earlier versions), n<N>-<activation>-k<K> for the
    other k-sparse activations, n<N>-<activation> for relu / jumprelu (no k)."""
    if activation == "topk":
        return f"n{num_latents}-k{k}"
    return f"n{num_latents}-{activation}" + (f"-k{k}" if activation in K_ACTIVATIONS else "")


def compound_metrics_path(run: RunDir, num_latents: int, k: int, activation: str = "topk") -> Path:
    """Where a several-site fit writes its compound splice metrics (all SAEs spliced at once)."""
    return run.sae_fit / f"compound-{shape_tag(num_latents, k, activation)}.json"


@dataclass(frozen=True)
class FitPlan:
    """A validated `tti sae fit` job (built by prepare_fit, read by every rank)."""

    run_dir: str
    """The trained run's directory."""
    cfg: RunConfig
    """The run's resolved config (RUN/config.yaml)."""
    ckpt_dir: str
    """RUN/checkpoints."""
    tag: str
    """Checkpoint tag loaded, e.g. global_step20."""
    site: str
    """Replicated hookpoint the SAE reads."""
    site_dim: int
    """Width d of the site."""
    sae_cfg: SAEConfig
    """The SAE (TopK unless an activation was chosen)."""
    steps: int
    """SAE optimizer steps (one micro-batch per DP rank each)."""
    lr: float
    """Adam learning rate (constant)."""
    seed: int
    """SAE initialisation seed."""
    out_dir: str
    """Where sae_metrics.json and the SAE shards go."""
    nproc: int
    """Processes; a multiple of the run's tp_size."""
    target: str | None = None
    """A transcoder's target, blocks.<i>.mlp.out (site is then blocks.<i>.resid_mid); None: an SAE."""
    skip: bool = False
    """Transcoder only: with the skip term W_skip x (a skip transcoder)."""

    @property
    def block(self) -> int | None:
        """The transcoder's block i; None for an SAE."""
        return None if self.target is None else int(self.site.split(".")[1])

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks of the fit job."""
        return self.nproc // self.cfg.parallel.tp_size


def _replicated_hint(cfg: RunConfig) -> str:
    return summarize_names([n for n in gpt_hookpoint_names(cfg.model) if not is_tp_sharded(n)])


def prepare_fit(run_dir: str | Path, sites: str | list[str], num_latents: int, k: int, checkpoint: str | None = None,
                steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, out: str | Path | None = None, seed: int = 0,
                nproc: int | None = None, activation: str = "topk",
                sae_options: dict | None = None, target: str | None = None,
                skip: bool = False) -> tuple[FitPlan, ...]:
    """Validate everything before any process starts; raise a one-line ConfigError on a user error.

    One FitPlan per site (same checkpoint, shape, steps and seed), fitted in turn on one
    loaded model; `out` (the SAE's directory) is only allowed with a single site.
    `activation` is any SAEConfig activation (k is ignored for relu / jumprelu);
    `sae_options` sets further SAEConfig fields (FIT_OPTIONS), e.g. matryoshka_prefixes.
    `target` (blocks.<i>.mlp.out, with the single site blocks.<i>.resid_mid) fits a transcoder
    of that MLP instead (tti_dist/sae/transcoder.py), `skip` a skip transcoder.
    """
    if activation not in ACTIVATIONS:
        raise ConfigError(f"--activation: {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    options = dict(sae_options or {})
    unknown = sorted(set(options) - set(FIT_OPTIONS))
    if unknown:
        raise ConfigError(f"sae_options: {unknown[0]!r} is not a settable SAE field; allowed: {', '.join(FIT_OPTIONS)}")
    if "matryoshka_prefixes" in options:
        options["matryoshka_prefixes"] = tuple(options["matryoshka_prefixes"])
    sites = [sites] if isinstance(sites, str) else list(sites)
    if not sites:
        raise ConfigError("--site: give at least one replicated hookpoint")
    repeated = sorted({s for s in sites if sites.count(s) > 1})
    if repeated:
        raise ConfigError(f"--site: {', '.join(repeated)} given more than once; each site is fitted once")
    if out is not None and len(sites) > 1:
        raise ConfigError(f"--out: {str(out)!r} names one SAE's directory; with {len(sites)} sites leave it out "
                          "(each goes to RUN/sae_fit/<site>-n<N>-k<K>)")
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    cfg = run.load_config()
    names = gpt_hookpoint_names(cfg.model)
    for site in sites:
        if site not in names:
            raise ConfigError(f"--site: {site!r} is not a hookpoint of this run's model; available: "
                              f"{summarize_names(names)}")
        if is_tp_sharded(site):
            raise ConfigError(f"--site: {site} is split across tensor-parallel ranks; an SAE needs a replicated site "
                              f"({_replicated_hint(cfg)})")
    if target is not None or skip:
        _check_transcoder(names, sites, target, options)
    sae_kw = dict(activation=activation, **options)
    first = _prepare_site(run, cfg, sites[0], num_latents, k, checkpoint, steps, lr, out, seed, nproc, sae_kw)
    if target is not None:
        if out is None:
            tag = shape_tag(num_latents, k, first.sae_cfg.activation) + ("-skip" if skip else "")
            out = run.sae_fit / f"transcoder-blocks.{sites[0].split('.')[1]}.mlp-{tag}"
        return (replace(first, target=target, skip=skip, out_dir=str(out)),)
    return (first,) + tuple(
        _prepare_site(run, cfg, site, num_latents, k, checkpoint, steps, lr, None, seed, nproc, sae_kw)
        for site in sites[1:])


def _check_transcoder(names: list[str], sites: list[str], target: str | None, options: dict) -> None:
    """A transcoder reads one block's resid_mid and predicts the same dense block's mlp.out."""
    if target is None:
        raise ConfigError("--skip: only used with --target (a skip transcoder)")
    if len(sites) != 1:
        raise ConfigError(f"--target: a transcoder has one --site, the MLP's input (got {len(sites)})")
    match = re.fullmatch(r"blocks\.(\d+)\.resid_mid", sites[0])
    want = f"blocks.{match.group(1)}.mlp.out" if match else None
    if want is None or target != want or target not in names:
        raise ConfigError(f"--target: {target!r} with --site {sites[0]}; a transcoder reads blocks.<i>.resid_mid and "
                          f"predicts blocks.<i>.mlp.out of the same dense block, e.g. --site blocks.1.resid_mid "
                          f"--target blocks.1.mlp.out")
    options.setdefault("normalize_input", True)  # the MLP's LayerNorm without its affine map, as type: transcoder


def _prepare_site(run: RunDir, cfg: RunConfig, site: str, num_latents: int, k: int, checkpoint: str | None,
                  steps: int, lr: float, out: str | Path | None, seed: int, nproc: int | None,
                  sae_kw: dict) -> FitPlan:
    run_dir = run.root
    tag = run.resolve_checkpoint(checkpoint)
    ckpt_dir = run.checkpoints
    tp = cfg.parallel.tp_size
    if num_latents < 2:
        raise ConfigError(f"--latents: {num_latents} must be an integer >= 2")
    if num_latents % tp:
        raise ConfigError(f"--latents: {num_latents} must be divisible by the run's parallel.tp_size {tp}")
    if sae_kw["activation"] in K_ACTIVATIONS and not 1 <= k <= num_latents:
        raise ConfigError(f"--k: {k} must be in 1..latents ({num_latents})")
    if steps < 1:
        raise ConfigError(f"--steps: {steps} must be >= 1")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr: {lr!r} must be a finite number > 0")
    if seed < 0:
        raise ConfigError(f"--seed: {seed} must be >= 0")
    nproc = cfg.parallel.world_size if nproc is None else nproc
    if nproc < 1 or nproc % tp:
        raise ConfigError(f"--nproc: {nproc} must be a positive multiple of the run's parallel.tp_size {tp}")
    if not (ckpt_dir / tag / TP_LAYOUT_FILE).is_file():
        raise ConfigError(f"--checkpoint: {ckpt_dir / tag} has no tp_layout.json; not a tti checkpoint")
    d = hookpoint_width(site, cfg.model)
    tokens_per_step = cfg.train.micro_batch_size * (nproc // tp) * cfg.data.seq_len
    # Short fits: a latent counts as dead after a quarter of the fit's tokens (at most the
    # default dead_window_tokens, 10M), so AuxK can act at all.
    window = max(1, min(10_000_000, steps * tokens_per_step // 4))
    known = {f.name for f in fields(SAEConfig)}
    sae_cfg = SAEConfig(num_latents=num_latents, k=k, dead_window_tokens=window,
                        **{name: v for name, v in sae_kw.items() if name in known})
    sae_cfg.validate(d, tp, "sae")
    cfg, dataset = resolve_dataset(cfg, run_dir)
    windows = run_windows(cfg, dataset)
    for split in ("train", "val"):
        DistributedBatchLoader(windows, split, cfg.train.micro_batch_size, 0, nproc // tp, cfg.train.seed)
    out_dir = Path(out) if out is not None else run.sae_fit / f"{site}-{shape_tag(num_latents, k, sae_cfg.activation)}"
    return FitPlan(run_dir=str(run_dir), cfg=cfg, ckpt_dir=str(ckpt_dir), tag=tag, site=site, site_dim=d,
                   sae_cfg=sae_cfg, steps=steps, lr=lr, seed=seed, out_dir=str(out_dir), nproc=nproc)
