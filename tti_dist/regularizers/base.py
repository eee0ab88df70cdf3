"""The regularizer interface: config entries -> registered types -> losses on local shards.

A regularizer is one entry of the config's `regularizers` list:

    {type: l1, name: l1_mlp, coefficient: 1e-3, hookpoints: ["blocks.*.mlp.act"],
     schedule: {kind: linear_warmup, warmup_steps: 100}, <type-specific keys>}

`parse_specs` checks every entry before any process starts (known type, unique name,
coefficient >= 0, schedule, type-specific keys typed by the type's `Params` dataclass,
hookpoint globs against the model's hookpoint names). `build_regularizers` instantiates
them once per rank around the built model. The trainer captures the union of their
hookpoints during the forward and calls each with the captured local shards; a call
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

import dataclasses
import fnmatch
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tti_dist.capture.hookpoints import HookPointInfo, resolve_hookpoints, summarize_names
from tti_dist.config.schema import ModelConfig
from tti_dist.errors import ConfigError
from tti_dist.models.layout import model_layout
from tti_dist.regularizers.schedule import ScheduleConfig

COMMON_KEYS = ("type", "name", "coefficient", "hookpoints", "schedule")


@dataclass(frozen=True)
class NoParams:
    """A regularizer type without settings of its own."""


@dataclass(frozen=True)
class RegularizerSpec:
    """One validated config entry."""

    index: int
    """Position in the config's regularizers list (for error messages)."""
    type: str
    """Registered type name."""
    name: str
    """Instance name, unique in the run; metric tags are reg/<name>/*."""
    coefficient: float
    """Weight of the loss at full schedule strength."""
    hookpoints: tuple[str, ...]
    """Hookpoint globs the regularizer reads."""
    schedule: ScheduleConfig
    """How the coefficient changes over optimizer steps."""
    params: Any
    """The type's Params dataclass instance."""

    @property
    def where(self) -> str:
        """Config path of this entry, for errors."""
        return f"regularizers[{self.index}]"


class Regularizer(ABC):
    """Base class: subclasses set `type_name`, `Params`, and implement `loss`."""

    type_name: ClassVar[str]
    """The config's `type` value."""
    Params: ClassVar[type] = NoParams
    """Dataclass of type-specific settings (each field documented)."""
    uses_hookpoints: ClassVar[bool] = True
    """False for regularizers on weights rather than activations."""

    def __init__(self, spec: RegularizerSpec, model: nn.Module, groups) -> None:
        self.spec = spec
        self.params = spec.params
        self.model = model
        self.groups = groups
        self.hookpoints: list[HookPointInfo] = (
            resolve_hookpoints(model, spec.hookpoints, f"{spec.where}.hookpoints") if self.uses_hookpoints else []
        )

    @property
    def captures(self) -> list[HookPointInfo]:
        """Hookpoints whose activations `loss` reads (the trainer captures their union).

        The matched hookpoints by default; a type that also reads related sites (e.g. a
        bottleneck's mu and logvar next to its z) adds them here.
        """
        return self.hookpoints

    def eval_metrics(self, model: nn.Module, batches: list[torch.Tensor]) -> dict[str, float]:
        """Metrics measured at eval steps on the validation batches (collective; identical on
        every rank), e.g. an SAE's splice metrics. None by default."""
        return {}

    def state_dict(self) -> dict:
        """Sampling state to checkpoint (e.g. call counters keying a sampler), so that a
        resumed run draws exactly the samples the uninterrupted run would have. Must be the
        same on every rank (it is saved once per TP rank)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def after_optimizer_step(self) -> None:
        """Optional hook, called by the trainer once per optimizer step, right after the
        engine's step at the gradient-accumulation boundary (after the last micro-step), on
        every rank. For regularizers with parameters of their own that DeepSpeed does not
        train (e.g. `sae`'s own optimizer step). Default: nothing."""

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


REGISTRY: dict[str, type[Regularizer]] = {}


def register(cls: type[Regularizer]) -> type[Regularizer]:
    """Class decorator adding a regularizer type to the registry under `cls.type_name`."""
    REGISTRY[cls.type_name] = cls
    return cls


def _registered() -> dict[str, type[Regularizer]]:
    # Importing the package registers every built-in type.
    import tti_dist.regularizers  # noqa: F401

    return REGISTRY


def parse_specs(entries: tuple[dict, ...] | list[dict], model_cfg: ModelConfig, tp_size: int = 1) -> list[RegularizerSpec]:
    """Validate config entries into specs; ConfigError (one line, field path) on the first problem.

    `tp_size` is the run's tensor-parallel degree: limits that depend on the local shard
    (e.g. directions sampled per rank) are checked here, before launch, not in the ranks.
    """
    from tti_dist.config.load import section_from_dict

    registry = _registered()
    layout = model_layout(model_cfg)
    names = layout.hookpoint_names
    float_names = [h.name for h in layout.hookpoints if h.is_float]
    specs: list[RegularizerSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"regularizers[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with type, name, coefficient, ...; got {entry!r}")
        kind = entry.get("type")
        if kind not in registry:
            raise ConfigError(f"{where}.type: {kind!r} is not a known regularizer; choose one of {', '.join(sorted(registry))}")
        cls = registry[kind]
        name = entry.get("name", kind)
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"{where}.name: {name!r} must be a non-empty string without '/'")
        if name in seen:
            raise ConfigError(f"{where}.name: {name!r} is already used by another regularizer; names must be unique")
        seen.add(name)
        coefficient = entry.get("coefficient", 0.0)
        if isinstance(coefficient, str):
            try:
                coefficient = float(coefficient)
            except ValueError:
                pass
        if not isinstance(coefficient, (int, float)) or isinstance(coefficient, bool) \
                or not math.isfinite(coefficient) or coefficient < 0:
            raise ConfigError(f"{where}.coefficient: {coefficient!r} must be a finite number >= 0")
        hookpoints = entry.get("hookpoints")
        if hookpoints is None:
            hookpoints = []
        elif isinstance(hookpoints, str):
            hookpoints = [hookpoints]
        if not isinstance(hookpoints, (list, tuple)):
            raise ConfigError(f"{where}.hookpoints: expected a list of hookpoint globs, got {hookpoints!r}")
        for j, pattern in enumerate(hookpoints):
            if not isinstance(pattern, str):
                raise ConfigError(f"{where}.hookpoints[{j}]: expected a glob (a string), got {pattern!r}")
        if cls.uses_hookpoints:
            if not hookpoints:
                raise ConfigError(f"{where}.hookpoints: {kind!r} needs at least one hookpoint glob; "
                                  f"available: {summarize_names(float_names)}")
            for j, pattern in enumerate(hookpoints):
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    raise ConfigError(f"{where}.hookpoints[{j}]: {pattern!r} matches no hookpoint; "
                                      f"available: {summarize_names(float_names)}")
        elif hookpoints:
            raise ConfigError(f"{where}.hookpoints: {kind!r} acts on weights and takes no hookpoints")
        schedule = section_from_dict(ScheduleConfig, entry.get("schedule") or {}, f"{where}.schedule.")
        schedule.validate(f"{where}.schedule")
        rest = {k: v for k, v in entry.items() if k not in COMMON_KEYS}
        allowed = list(COMMON_KEYS) + [f.name for f in dataclasses.fields(cls.Params)]
        for key in rest:
            if key not in allowed:
                import difflib

                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ConfigError(f"{where}.{key}: unknown key for type {kind!r}; {hint}valid keys: {', '.join(allowed)}")
        params = section_from_dict(cls.Params, rest, f"{where}.")
        matched = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in hookpoints)]
        cls.check_params(params, model_cfg, matched, where, tp_size)
        for j, pattern in enumerate(hookpoints):
            ids = [n for n in names if n not in float_names and fnmatch.fnmatchcase(n, pattern)]
            if ids:
                # Token ids and expert choices are int64: no type reads them as activations (a
                # loss on them would fail in every rank). After check_params, whose messages
                # about a type's own sites are more precise.
                raise ConfigError(f"{where}.hookpoints[{j}]: {pattern!r} matches {summarize_names(ids)}, which hold "
                                  f"integer ids, not activations; choose among {summarize_names(float_names)}")
        specs.append(RegularizerSpec(i, kind, name, float(coefficient), tuple(hookpoints), schedule, params))
    return specs


def build_regularizers(specs: list[RegularizerSpec], model: nn.Module, groups) -> list[Regularizer]:
    """Instantiate each spec's type around the built model (once per rank)."""
    registry = _registered()
    return [registry[s.type](s, model, groups) for s in specs]


def spec_to_dict(spec: RegularizerSpec) -> dict:
    """Plain mapping of a spec (for logs and reports)."""
    return {"type": spec.type, "name": spec.name, "coefficient": spec.coefficient,
            "hookpoints": list(spec.hookpoints), "schedule": dataclasses.asdict(spec.schedule),
            **dataclasses.asdict(spec.params)}
