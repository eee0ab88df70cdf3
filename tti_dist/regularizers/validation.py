"""Checks of the config's regularizer entries against the model, before any process starts.

The entries are typed and field-checked when the config is loaded
(tti_dist.config.regularizers); what needs the model's layout (tti_dist.models.layout) is
checked here: hookpoint globs against the model's hookpoint names, each type's own limits
for the model and the tensor-parallel degree (`Regularizer.check_params`), and that no glob
reads integer ids. `validate_run_config` is the whole check of a run config: the field
checks of config.validate (which imports no torch, so `tti --help` stays instant), a visible
CUDA device for train.device cuda, then these.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch

from tti_dist.capture.hookpoints import summarize_names
from tti_dist.config.regularizers import RegularizerConfig, parse_regularizers
from tti_dist.config.schema import ModelConfig, RunConfig
from tti_dist.config.validate import validate_config
from tti_dist.errors import ConfigError
from tti_dist.models.layout import model_layout
from tti_dist.models.weight_sparsity import selected_matrices
from tti_dist.regularizers.base import REGISTRY


def validate_run_config(cfg: RunConfig, world_size: int | None = None) -> None:
    """Raise `ConfigError` (one line) on the first problem of the run config; None when usable.

    `world_size`: the number of processes the launcher starts, when known. Besides the
    config's own fields (config.validate, which imports no torch), this checks what needs
    the model's layout or this machine: the regularizers, and a visible CUDA device for
    train.device cuda."""
    validate_config(cfg, world_size)
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    check_regularizers(cfg.regularizers, cfg.model, cfg.parallel.tp_size)
    if cfg.weight_sparsity is not None:
        selected_matrices(cfg.model, cfg.weight_sparsity)


def checked_regularizers(entries: Any, model_cfg: ModelConfig, tp_size: int = 1) -> tuple[RegularizerConfig, ...]:
    """Raw entries (a config's `regularizers` list) parsed and checked against the model, as
    loading and validating a run config does; for building regularizers without a run config."""
    regularizers = parse_regularizers(entries)
    check_regularizers(regularizers, model_cfg, tp_size)
    return regularizers


def check_regularizers(regularizers: tuple[RegularizerConfig, ...] | list[RegularizerConfig], model_cfg: ModelConfig,
                       tp_size: int = 1) -> None:
    """ConfigError (one line, field path) on the first entry that does not fit the model.

    `tp_size` is the run's tensor-parallel degree: limits that depend on the local shard
    (e.g. directions sampled per rank) are checked here, before launch, not in the ranks.
    """
    layout = model_layout(model_cfg)
    names = layout.hookpoint_names
    float_names = [h.name for h in layout.hookpoints if h.is_float]
    for reg in regularizers:
        where = reg.where
        if reg.params.uses_hookpoints:
            if not reg.hookpoints:
                raise ConfigError(f"{where}.hookpoints: {reg.type!r} needs at least one hookpoint glob; "
                                  f"available: {summarize_names(float_names)}")
            for j, pattern in enumerate(reg.hookpoints):
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    raise ConfigError(f"{where}.hookpoints[{j}]: {pattern!r} matches no hookpoint; "
                                      f"available: {summarize_names(float_names)}")
        matched = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in reg.hookpoints)]
        if reg.type not in REGISTRY:
            # A plugin that registered this type's settings (register_config) but no Regularizer class.
            raise ConfigError(f"{where}.type: {reg.type!r} has settings but no registered Regularizer class "
                              f"(@register); registered types: {', '.join(sorted(REGISTRY))}")
        REGISTRY[reg.type].check_params(reg.params, model_cfg, matched, where, tp_size)
        for j, pattern in enumerate(reg.hookpoints):
            ids = [n for n in names if n not in float_names and fnmatch.fnmatchcase(n, pattern)]
            if ids:
                # Token ids and expert choices are int64: no type reads them as activations (a
                # loss on them would fail in every rank). After check_params, whose messages
                # about a type's own sites are more precise.
                raise ConfigError(f"{where}.hookpoints[{j}]: {pattern!r} matches {summarize_names(ids)}, which hold "
                                  f"integer ids, not activations; choose among {summarize_names(float_names)}")
