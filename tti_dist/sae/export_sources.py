"""Where `tti sae export` reads an SAE from, checked before anything is written.

    RUN      a run directory whose config has `type: sae` regularizer entries: the entry's SAE
             as saved in a checkpoint (DeepSpeed's client state, "regularizers" -> <name> ->
             "sae", once per TP rank in that rank's model-states file; tti_dist.train.trainer)
    FIT_DIR  a `tti sae fit` output directory: one safetensors shard per TP rank
             (tti_dist.sae.files) and sae_metrics.json, which names the site and the run

`find_source` tells them apart (RUN has config.yaml, FIT_DIR has SAE shards) and returns an
`SAESource`: the SAE's settings, its TP shards in rank order, the site, the run's model
config and where it came from. Every problem is a one-line ConfigError (exit 2).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from tti_dist.config.sae import SAEConfig
from tti_dist.config.schema import ModelConfig, RunConfig
from tti_dist.errors import ConfigError
from tti_dist.models.layout import gpt_hookpoint_names, hookpoint_width
from tti_dist.rundir import CONFIG_FILE, EXPERT_FILE, RunDir, model_states_file
from tti_dist.sae.files import read_shard, shard_files
from tti_dist.sae.fit_plan import METRICS_FILE
from tti_dist.utils.safe_load import DEEPSPEED_GLOBALS, load_torch_file


@dataclass(frozen=True)
class SAESource:
    """One SAE to export, read and checked."""

    sae_cfg: SAEConfig
    """Its settings (a `type: sae` entry's params, or the fit's SAEConfig)."""
    where: str
    """Where its settings come from, for errors: regularizers[i] or the fit directory's shard."""
    d_in: int
    """Input width (the site's width)."""
    site: str
    """The tti hookpoint it reads."""
    model_cfg: ModelConfig
    """The run's model."""
    run_cfg: RunConfig
    """The run's resolved config (context size for the metadata)."""
    shards: list[dict[str, torch.Tensor]]
    """ParallelSAE state dicts, one per TP rank, in rank order."""
    provenance: dict[str, Any]
    """kind ("cotrained" | "fit"), run, checkpoint, and entry or fit_dir."""


def find_source(path: str | Path, checkpoint: str | None = None, name: str | None = None) -> SAESource:
    """The SAE at `path`: a run directory's co-trained entry, or a `tti sae fit` directory."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return cotrained_source(path, checkpoint, name)
    if path.is_dir() and any(path.glob("transcoder_tp_rank*.safetensors")):
        raise ConfigError(f"FIT_DIR: '{path}' holds a transcoder (tti sae fit --target); tti sae export writes "
                          "SAEs only (SAELens's transcoder formats are not mapped)")
    if path.is_dir() and shard_files(path):
        for flag, value in (("--checkpoint", checkpoint), ("--name", name)):
            if value is not None:
                raise ConfigError(f"{flag}: {value!r} applies to a run directory; '{path}' is a tti sae fit output "
                                  "directory (one SAE, fitted on one checkpoint)")
        return fit_source(path)
    raise ConfigError(f"RUN|FIT_DIR: '{path}' is neither a tti run directory (no {CONFIG_FILE}) nor a tti sae fit "
                      "output directory (no sae_tp_rank*.safetensors)")


def cotrained_source(run_dir: Path, checkpoint: str | None, name: str | None) -> SAESource:
    """A `type: sae` entry of RUN's config, with its SAE state from checkpoint `checkpoint`."""
    run = RunDir(run_dir)
    cfg = run.load_config()
    entries = [r for r in cfg.regularizers if r.type == "sae"]
    names = ", ".join(r.name for r in entries)
    if name is not None and any(r.name == name and r.type == "transcoder" for r in cfg.regularizers):
        raise ConfigError(f"--name: {name!r} is a `type: transcoder` entry; tti sae export writes SAEs only "
                          "(SAELens's transcoder formats are not mapped)")
    if not entries:
        raise ConfigError(f"RUN: '{run_dir}' has no `type: sae` regularizer entry (a tti sae fit SAE is exported "
                          "from its own output directory)")
    if name is None:
        if len(entries) > 1:
            raise ConfigError(f"--name: RUN has {len(entries)} `type: sae` entries ({names}); choose one with --name")
        entry = entries[0]
    else:
        matching = [r for r in entries if r.name == name]
        if not matching:
            raise ConfigError(f"--name: {name!r} is not a `type: sae` entry of RUN; available: {names}")
        entry = matching[0]
    hookpoints = gpt_hookpoint_names(cfg.model)
    sites = [h for h in hookpoints if any(fnmatch.fnmatchcase(h, p) for p in entry.hookpoints)]
    if len(sites) != 1:  # tti train checked this; a hand-edited config.yaml may not be
        raise ConfigError(f"{entry.where}.hookpoints: {list(entry.hookpoints)} match {len(sites)} sites; an SAE "
                          "reads exactly one")
    tag = run.resolve_checkpoint(checkpoint)
    tp = cfg.parallel.tp_size
    shards = []
    for r in range(tp):
        state = load_torch_file(_model_states_path(run.checkpoints / tag, r), DEEPSPEED_GLOBALS, mmap=True)
        sae_state = (state.get("regularizers") or {}).get(entry.name, {}).get("sae") if isinstance(state, dict) else None
        if not isinstance(sae_state, dict):
            raise ConfigError(f"--checkpoint: {tag} of '{run_dir}' holds no state of SAE entry {entry.name!r} "
                              "(saved before the entry was in the config?)")
        shards.append({k: v.clone() for k, v in sae_state.items() if isinstance(v, torch.Tensor)})
    return SAESource(sae_cfg=entry.params, where=entry.where, d_in=hookpoint_width(sites[0], cfg.model),
                     site=sites[0], model_cfg=cfg.model, run_cfg=cfg, shards=shards,
                     provenance={"kind": "cotrained", "run": str(run_dir.resolve()), "checkpoint": tag,
                                 "entry": entry.name})


def _model_states_path(tag_dir: Path, tp_rank: int) -> Path:
    """TP rank `tp_rank`'s model-states file, which holds the client state: DeepSpeed's
    mp_rank_XX_model_states.pt (ZeRO 0-2), or under ZeRO-3 one per DP rank, named
    zero_pp_rank_<D>_mp_rank_XX_model_states.pt (the SAE state is the same on every DP rank)."""
    plain = tag_dir / model_states_file(tp_rank)
    if plain.is_file():
        return plain
    found = sorted(f for f in tag_dir.glob("*" + model_states_file(tp_rank)) if not EXPERT_FILE.match(f.name))
    if not found:
        raise ConfigError(f"--checkpoint: {tag_dir} has no {model_states_file(tp_rank)} (TP rank {tp_rank}'s client "
                          "state); not a complete tti checkpoint")
    return found[0]


def fit_source(fit_dir: Path) -> SAESource:
    """A `tti sae fit` output directory: its shards, and its site and run from sae_metrics.json."""
    files = shard_files(fit_dir)
    metas, shards = zip(*(read_shard(f) for f in files))
    tp = metas[0]["tp_size"]
    ranks = [m["tp_rank"] for m in metas]
    if ranks != list(range(tp)) or any(m["tp_size"] != tp for m in metas):
        raise ConfigError(f"FIT_DIR: '{fit_dir}' holds the shards of TP ranks {ranks}; an SAE fitted at tp_size {tp} "
                          f"needs ranks 0..{tp - 1}, each once")
    known = {f.name for f in fields(SAEConfig)}
    # JSON has lists where SAEConfig holds tuples (matryoshka_prefixes)
    sae_cfg = SAEConfig(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in metas[0]["sae_config"].items() if k in known})
    record_path = fit_dir / METRICS_FILE
    try:
        record = json.loads(record_path.read_text())
        site, run_dir, tag = record["site"], Path(record["run"]), record["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"FIT_DIR: {record_path} is missing or not tti sae fit's record "
                          f"({type(exc).__name__}); it names the SAE's site and run") from None
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"FIT_DIR: the run the SAE was fitted on, '{run_dir}' ({METRICS_FILE}'s run), has no "
                          f"{CONFIG_FILE}; its model and context size go into the export's metadata")
    cfg = RunDir(run_dir).load_config()
    if site not in gpt_hookpoint_names(cfg.model):
        raise ConfigError(f"FIT_DIR: site {site!r} of {record_path} is not a hookpoint of the run's model")
    return SAESource(sae_cfg=sae_cfg, where=f"{files[0]}: sae_config", d_in=int(metas[0]["d_model"]), site=site,
                     model_cfg=cfg.model, run_cfg=cfg, shards=list(shards),
                     provenance={"kind": "fit", "run": str(run_dir.resolve()), "checkpoint": tag,
                                 "fit_dir": str(fit_dir.resolve())})
