"""The regularizer interface: typed config entries -> registered implementations -> losses on local shards.

A regularizer is one entry of the config's `regularizers` list:

    {type: l1, name: l1_mlp, coefficient: 1e-3, hookpoints: ["blocks.*.mlp.act"],
     schedule: {kind: linear_warmup, warmup_steps: 100}, <type-specific keys>}

The loader parses each entry into a `RegularizerConfig` (tti_dist.config.regularizers: the
type's settings class is registered there), and tti_dist.regularizers.validation checks it
against the model before any process starts. A type's implementation is a `Regularizer`
subclass registered here under the same type name (`register`); `build_regularizers`
instantiates them once per rank around the built model. The trainer captures the union of
their hookpoints during the forward and calls each with the captured local shards; a call
returns the weighted loss (coefficient x schedule factor x loss) and detached metrics
tagged `reg/<name>/loss` (unweighted), `reg/<name>/coefficient` (effective) and
`reg/<name>/<metric>` for the type's own.

Every loss is computed on each tensor-parallel rank's own shard and reduced over an
explicit group, so that it is the same replicated scalar on every TP rank and equals the
unsharded model's value; each type documents its reduce group and what it communicates.
Over data parallelism, losses are means over the local batch: DeepSpeed averages the
gradients over the DP group, so with equal local batches the update equals that of the
global-batch mean (types whose loss is not such a mean reduce over DP themselves).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from tti_dist.capture.hookpoints import HookPointInfo, resolve_hookpoints
from tti_dist.config.regularizers import CONFIG_TYPES, RegularizerConfig, RegularizerTypeConfig
from tti_dist.config.schema import ModelConfig


class Regularizer(ABC):
    """Base class: subclasses set `Config` (their settings class) and implement `loss`."""

    Config: ClassVar[type[RegularizerTypeConfig]]
    """The type's settings class (tti_dist.config.regularizers); its `type_name` is the
    config's `type` value and the key this implementation is registered under."""

    def __init__(self, spec: RegularizerConfig, model: nn.Module, groups) -> None:
        self.spec = spec
        self.params = spec.params
        self.model = model
        self.groups = groups
        self.hookpoints: list[HookPointInfo] = (
            resolve_hookpoints(model, spec.hookpoints, f"{spec.where}.hookpoints") if self.Config.uses_hookpoints else []
        )

    @property
    def captures(self) -> list[HookPointInfo]:
        """Hookpoints whose activations `loss` reads (the trainer captures their union).

        The matched hookpoints by default; a type that also reads related sites (e.g. a
        bottleneck's mu and logvar next to its z) adds them here.
        """
        return self.hookpoints

    def state_dict(self) -> dict:
        """Sampling state to checkpoint (e.g. call counters keying a sampler), so that a
        resumed run draws exactly the samples the uninterrupted run would have. Must be the
        same on every rank (it is saved once per TP rank)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    @classmethod
    def check_params(cls, params: Any, model_cfg: ModelConfig, hookpoints: list[str], where: str,
                     tp_size: int) -> None:
        """Type-specific checks before any process starts (e.g. k <= width / tp_size); ConfigError on failure."""

    @abstractmethod
    def loss(self, acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Unweighted loss (a scalar, replicated across TP ranks) and detached metrics."""

    def __call__(self, acts: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(coefficient x schedule factor x loss, metrics tagged reg/<name>/*)."""
        weight = self.spec.coefficient * self.spec.schedule.factor(step)
        value, own = self.loss(acts)
        prefix = f"reg/{self.spec.name}/"
        metrics = {prefix + "loss": value.detach(), prefix + "coefficient": torch.tensor(weight)}
        metrics.update({prefix + k: v.detach() for k, v in own.items()})
        return weight * value, metrics


class CoTrainedModule(ABC):
    """A regularizer that trains a module of its own beside the model (the `sae` type's SAE).

    Its parameters are not the model's: DeepSpeed never sees them, and the regularizer steps
    them itself. The trainer calls `after_optimizer_step` once per optimizer step, right after
    the engine's step at the gradient-accumulation boundary, on every rank, and adds
    `eval_metrics` at eval steps; `tti eval` reads the same metrics from a checkpoint. Its
    training state (weights, optimizer, counters) travels through `state_dict`, like every
    regularizer's sampling state.
    """

    @abstractmethod
    def after_optimizer_step(self) -> None:
        """The module's own optimizer step (collective over its groups)."""

    @abstractmethod
    def eval_metrics(self, model: nn.Module, batches: list[torch.Tensor]) -> dict[str, float]:
        """Metrics on the validation batches (collective; identical on every rank), e.g. an
        SAE's splice metrics."""


REGISTRY: dict[str, type[Regularizer]] = {}
"""Implementation of every regularizer type, by type name (the package registers the built-in ones)."""


def register(cls: type[Regularizer]) -> type[Regularizer]:
    """Class decorator adding a regularizer implementation to REGISTRY under its settings
    class's type name; ValueError when that name is taken already or has no settings class
    registered in tti_dist.config.regularizers."""
    name = cls.Config.type_name
    if name in REGISTRY:
        raise ValueError(f"regularizer type {name!r} is already registered by {_qualified(REGISTRY[name])}; "
                         f"cannot register {_qualified(cls)} under it too")
    if CONFIG_TYPES.get(name) is not cls.Config:
        raise ValueError(f"regularizer type {name!r} of {_qualified(cls)}: its Config {_qualified(cls.Config)} is not "
                         "the settings class registered under that name (tti_dist.config.regularizers.register_config)")
    REGISTRY[name] = cls
    return cls


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def build_regularizers(configs: tuple[RegularizerConfig, ...] | list[RegularizerConfig], model: nn.Module,
                       groups) -> list[Regularizer]:
    """Instantiate each entry's type around the built model (once per rank)."""
    return [REGISTRY[c.type](c, model, groups) for c in configs]
