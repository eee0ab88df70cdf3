"""The run config's `regularizers` section: one typed entry per regularizer.

An entry of the YAML list

    {type: l1, name: l1_mlp, coefficient: 1e-3, hookpoints: ["blocks.*.mlp.act"],
     schedule: {kind: linear_warmup, warmup_steps: 100}, <type-specific keys>}

becomes a `RegularizerConfig`: the keys every type shares, and `params`, an instance of the
type's settings class, a frozen dataclass registered here under the type's name
(`register_config`; a name registered twice is an error). The implementation of each type
(tti_dist.regularizers) registers under the same name. `parse_regularizers` builds the
entries once, when the config is loaded (config.load), checking a known type, a unique
name, a finite coefficient >= 0, hookpoints as a list of globs (none for a type that acts
on weights), the schedule, and the type's own keys typed by its settings class (an unknown
key names the closest valid one); each problem is a one-line ConfigError naming the field.
What needs the model's layout (hookpoint globs, each type's limits for the model and the
tensor-parallel degree) is checked by tti_dist.regularizers.validation.

Coefficient schedules. A regularizer's effective weight at optimizer step s (0-based, the
step being computed) is `coefficient * factor(s)`:

    s <  start_step or (stop_step is not None and s >= stop_step):  factor = 0
    constant:       factor = 1
    linear_warmup:  factor = min(1, (s - start_step + 1) / warmup_steps)
    linear_anneal:  factor = 1 + (final_ratio - 1) * p
    cosine_anneal:  factor = final_ratio + (1 - final_ratio) * (1 + cos(pi * p)) / 2
        with p = min(1, (s - start_step) / anneal_steps)

Warmups ramp a penalty in after the model has learned something (a strong sparsity penalty
from step 0 kills units before they carry information); anneals relax it, e.g. to hand over
to the task loss late in training.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from tti_dist.config.sae import RECON_NORMALIZATIONS, SAEConfig
from tti_dist.config.sections import section_from_dict
from tti_dist.errors import ConfigError

COMMON_KEYS = ("type", "name", "coefficient", "hookpoints", "schedule")
"""Keys every entry may have; the rest belong to the type's settings class."""


@dataclass(frozen=True)
class ScheduleConfig:
    """How a regularizer's coefficient changes over optimizer steps."""

    kind: Literal["constant", "linear_warmup", "linear_anneal", "cosine_anneal"] = "constant"
    """Shape of the schedule (formulas in the module docstring)."""
    start_step: int = 0
    """Optimizer step at which the regularizer switches on (factor 0 before)."""
    stop_step: int | None = None
    """Optimizer step at which it switches off again; null: never."""
    warmup_steps: int = 0
    """linear_warmup: steps from start_step to full strength."""
    anneal_steps: int = 0
    """linear_anneal / cosine_anneal: steps from start_step to final_ratio."""
    final_ratio: float = 0.0
    """linear_anneal / cosine_anneal: factor reached after anneal_steps."""

    def validate(self, where: str) -> None:
        """One-line ConfigError naming `where.<field>` on a bad value."""
        if self.start_step < 0:
            raise ConfigError(f"{where}.start_step: {self.start_step} must be >= 0")
        if self.stop_step is not None and self.stop_step <= self.start_step:
            raise ConfigError(
                f"{where}.stop_step: {self.stop_step} must be after start_step = {self.start_step}"
            )
        if self.kind == "linear_warmup" and self.warmup_steps < 1:
            raise ConfigError(f"{where}.warmup_steps: {self.warmup_steps} must be >= 1 for kind 'linear_warmup'")
        if self.kind in ("linear_anneal", "cosine_anneal"):
            if self.anneal_steps < 1:
                raise ConfigError(f"{where}.anneal_steps: {self.anneal_steps} must be >= 1 for kind {self.kind!r}")
            if not (math.isfinite(self.final_ratio) and self.final_ratio >= 0):
                raise ConfigError(f"{where}.final_ratio: {self.final_ratio!r} must be a finite number >= 0")

    def factor(self, step: int) -> float:
        """Multiplier of the coefficient at optimizer step `step`."""
        if step < self.start_step or (self.stop_step is not None and step >= self.stop_step):
            return 0.0
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear_warmup":
            return min(1.0, (step - self.start_step + 1) / self.warmup_steps)
        p = min(1.0, (step - self.start_step) / self.anneal_steps)
        if self.kind == "linear_anneal":
            return 1.0 + (self.final_ratio - 1.0) * p
        return self.final_ratio + (1.0 - self.final_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


# ----------------------------------------------------------------------------- type settings


@dataclass(frozen=True)
class RegularizerTypeConfig:
    """Base of the settings classes: one frozen dataclass per type, each field documented."""

    type_name: ClassVar[str]
    """The entry's `type` value this class is registered under."""
    uses_hookpoints: ClassVar[bool] = True
    """False for a type that acts on weights: its entries take no hookpoints."""


CONFIG_TYPES: dict[str, type[RegularizerTypeConfig]] = {}
"""Settings class of every regularizer type, by type name."""


def register_config(cls: type[RegularizerTypeConfig]) -> type[RegularizerTypeConfig]:
    """Class decorator adding a settings class to CONFIG_TYPES under `cls.type_name`;
    ValueError when that name is taken already."""
    name = cls.type_name
    if name in CONFIG_TYPES:
        taken = CONFIG_TYPES[name]
        raise ValueError(f"regularizer config type {name!r} is already registered by {taken.__module__}."
                         f"{taken.__qualname__}; cannot register {cls.__module__}.{cls.__qualname__} under it too")
    CONFIG_TYPES[name] = cls
    return cls


@register_config
@dataclass(frozen=True)
class L1Config(RegularizerTypeConfig):
    """`type: l1` has no settings of its own."""

    type_name = "l1"


@register_config
@dataclass(frozen=True)
class KLConfig(RegularizerTypeConfig):
    """`type: kl` has no settings of its own."""

    type_name = "kl"


@register_config
@dataclass(frozen=True)
class LoadBalanceConfig(RegularizerTypeConfig):
    """`type: load_balance` has no settings of its own."""

    type_name = "load_balance"


@register_config
@dataclass(frozen=True)
class RouterZConfig(RegularizerTypeConfig):
    """`type: router_z` has no settings of its own."""

    type_name = "router_z"


@register_config
@dataclass(frozen=True)
class RoutingEntropyConfig(RegularizerTypeConfig):
    """`type: routing_entropy` has no settings of its own."""

    type_name = "routing_entropy"


@register_config
@dataclass(frozen=True)
class RoutingConsistencyConfig(RegularizerTypeConfig):
    """`type: routing_consistency` has no settings of its own."""

    type_name = "routing_consistency"


@register_config
@dataclass(frozen=True)
class OrthogonalityConfig(RegularizerTypeConfig):
    """Settings of `type: orthogonality` (acts on weights: no hookpoints)."""

    type_name = "orthogonality"
    uses_hookpoints = False

    weights: tuple[str, ...] = ("blocks.*.mlp.fc1",)
    """Globs over linear layer names: blocks.{i}.attn.qkv, blocks.{i}.attn.proj, and in dense
    blocks blocks.{i}.mlp.fc1, blocks.{i}.mlp.fc2; in the bottleneck's block also
    blocks.{i}.bottleneck.enc_mu, .enc_logvar, .dec (`targetable_layers`; MoE blocks have no
    mlp.* layers and their experts are not targetable). The direction is inferred from the
    layer type: column-parallel (qkv, fc1, enc_*) -> rows of the weight (input directions of
    units), row-parallel (proj, fc2, dec) -> columns (output directions of units)."""
    mode: Literal["full", "sampled_local", "sampled_global"] = "full"
    """full: exact penalty over all direction pairs (all-gathers the normalized directions
    over TP). sampled_local: k sampled directions per TP rank, within-shard pairs only
    (one scalar all-reduce). sampled_global: k sampled directions per TP rank, all-gathered,
    all pairs, reweighted to an unbiased estimate of the full penalty."""
    k: int | None = None
    """Directions sampled per TP rank per matrix (sampled modes only; required there, not
    allowed with mode full). 2 <= k <= the local width (global width / tp_size)."""
    seed: int = 0
    """Base seed of the sampling generator (a private torch.Generator keyed on this seed,
    the layer, the TP rank and a per-layer forward counter; the global RNG is untouched)."""


@register_config
@dataclass(frozen=True)
class DecorrelationConfig(RegularizerTypeConfig):
    """Settings of `type: decorrelation`."""

    type_name = "decorrelation"

    normalize: bool = False
    """False: penalize the covariance matrix C of the units. True: penalize the correlation
    matrix R_ij = C_ij / sqrt((C_ii + eps)(C_jj + eps)) instead, which is scale-free (a unit
    cannot lower its penalty by shrinking)."""
    max_tokens: int | None = None
    """Tokens used per DP rank per micro-step (a uniform sample without replacement, the
    same tokens on every TP rank of a DP group); None uses all local tokens. Bounds the
    Gram cost, which is linear in tokens. Must be >= 2."""
    seed: int = 0
    """Seed of the token sample when max_tokens is set. The sample of a call depends on
    (seed, dp_rank, number of previous calls of this instance in this process); a private
    torch.Generator is used, the global RNG is never touched."""
    eps: float = 1e-5
    """Added to each unit's variance before normalizing (normalize: true only), so that
    dead / constant units get correlation ~0 instead of NaN. Must be > 0."""


@register_config
@dataclass(frozen=True)
class TotalCorrelationConfig(RegularizerTypeConfig):
    """Settings of `type: total_correlation`."""

    type_name = "total_correlation"

    estimator: Literal["mss", "mws"] = "mss"
    """Importance weights of the minibatch estimate (tti_dist.metrics.total_correlation):
    "mss" (minibatch stratified sampling; rows of weights sum to 1, read it as a value) or
    "mws" (minibatch weighted sampling, weights 1/(M N); its value is the uniform-weight
    estimate plus the constant (D - 1) log N, D = bottleneck_dim: same gradients)."""
    dataset_size: int | None = None
    """N, the number of data points x_n the aggregate posterior q(z) = (1/N) sum_n q(z|x_n)
    is over; a data point is one token in its context. null: N = M, the number of tokens in
    the global sample of the micro-step (all DP ranks' samples), i.e. q(z) is the mixture of
    the sampled tokens' posteriors and the estimate is a Monte-Carlo estimate of exactly that
    mixture's TC (with mss the weights become uniform 1/M). Set it to the training split's
    number of tokens to estimate the TC of the whole data distribution as Chen et al. do
    (mss then gives the own token weight 1/N, nearly leave-one-out; mws adds (D-1) log N).
    Must be >= 2."""
    max_tokens: int = 256
    """Tokens sampled per DP rank per micro-step (uniform, without replacement; the same
    tokens on every TP rank of a DP group); all local tokens when there are at most this
    many. The cost is quadratic in the sample: rows (this rank's sample) x M (all ranks').
    Must be >= 2."""
    seed: int = 0
    """Seed of the token sample. The sample of a call depends on (seed, dp_rank, number of
    previous calls of this instance in this process, checkpointed); a private
    torch.Generator is used, the global RNG is never touched."""


@register_config
@dataclass(frozen=True)
class SAERegularizerConfig(SAEConfig, RegularizerTypeConfig):
    """Settings of `type: sae`: the SAE itself (every field of SAEConfig, tti_dist/config/sae.py,
    so the entry *is* the SAE's config), its mode and its own optimizer."""

    type_name = "sae"

    mode: Literal["joint", "detached"] = "detached"
    """"detached": the SAE trains on x.detach(); the model gets no gradient from it.
    "joint": the model also receives coefficient x the gradient of the SAE's training loss
    with respect to the activation (normalized reconstruction + AuxK or L1 term)."""
    recon_normalize: Literal[RECON_NORMALIZATIONS] = "fvu"
    """Normalization of the reconstruction term (ParallelSAE.reconstruction_loss): "fvu" =
    sum ||x - x_hat||^2 / sum ||x - mean x||^2 over the micro-batch (1 - EV), which the model
    can lower neither by shrinking its activations nor by collapsing tokens onto their mean;
    "token" = mean of ||x - x_hat||^2 / ||x||^2 per token (scale-free only: in joint mode the
    model can drive EV negative while lowering it); "none" = plain MSE; "input_norm" =
    mean ||x - x_hat||^2 / mean ||x|| (Lai et al. 2025's joint-training loss, also applied to
    AuxK; not scale-free: it grows linearly with the activations' scale, and jointly trained
    models shrink the site to lower it, docs/experiments/lai_joint_sae.md)."""
    lr: float = 1e-3
    """Learning rate of the SAE's own Adam (constant; no warmup or decay). > 0."""
    betas: tuple[float, ...] = (0.9, 0.999)
    """Adam betas of the SAE's optimizer, two numbers in [0, 1)."""
    adam_eps: float = 1e-8
    """Adam epsilon of the SAE's optimizer, > 0."""
    seed: int = 0
    """Initialisation seed of the SAE (the weights do not depend on the TP size). >= 0."""
    redundancy_every: int = 100
    """Recompute reg/<name>/decoder_redundancy every this many optimizer steps (and at
    construction); the last value is reported at every step. 0 = never (no such metric).
    Costs an all-gather of W_dec and 2 d n^2 / tp FLOPs per computation."""


# ----------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class RegularizerConfig:
    """One entry of the config's regularizers list, checked field by field."""

    index: int
    """Position in the config's regularizers list (for error messages)."""
    type: str
    """Registered type name."""
    name: str
    """Instance name, unique in the run; metric tags are reg/<name>/*."""
    coefficient: float
    """Weight of the loss at full schedule strength."""
    hookpoints: tuple[str, ...]
    """Hookpoint globs the regularizer reads (none for a type acting on weights)."""
    schedule: ScheduleConfig
    """How the coefficient changes over optimizer steps."""
    params: RegularizerTypeConfig
    """The type's settings (an instance of CONFIG_TYPES[type])."""

    @property
    def where(self) -> str:
        """Config path of this entry, for errors."""
        return f"regularizers[{self.index}]"


def parse_regularizers(entries: Any) -> tuple[RegularizerConfig, ...]:
    """The config's raw `regularizers` list as RegularizerConfigs; a one-line ConfigError
    naming the field on the first problem."""
    if not isinstance(entries, (list, tuple)):
        raise ConfigError(f"regularizers: expected a list, got {entries!r}")
    seen: set[str] = set()
    return tuple(_parse_entry(i, entry, seen) for i, entry in enumerate(entries))


def _parse_entry(index: int, entry: Any, seen: set[str]) -> RegularizerConfig:
    where = f"regularizers[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with type, name, coefficient, ...; got {entry!r}")
    kind = entry.get("type")
    if not isinstance(kind, str) or kind not in CONFIG_TYPES:
        raise ConfigError(f"{where}.type: {kind!r} is not a known regularizer; choose one of {', '.join(sorted(CONFIG_TYPES))} "
                          "(a type of your own: name its module under `imports:`)")
    cls = CONFIG_TYPES[kind]
    name = entry.get("name", kind)
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{where}.name: {name!r} must be a non-empty string without '/'")
    if name in seen:
        raise ConfigError(f"{where}.name: {name!r} is already used by another regularizer; names must be unique")
    seen.add(name)
    coefficient = entry.get("coefficient", 0.0)
    if isinstance(coefficient, str):
        # YAML 1.1 reads '1e-3' (no dot) as a string; accept it as a number.
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
    if hookpoints and not cls.uses_hookpoints:
        raise ConfigError(f"{where}.hookpoints: {kind!r} acts on weights and takes no hookpoints")
    schedule = section_from_dict(ScheduleConfig, entry.get("schedule") or {}, f"{where}.schedule.")
    schedule.validate(f"{where}.schedule")
    rest = {k: v for k, v in entry.items() if k not in COMMON_KEYS}
    allowed = list(COMMON_KEYS) + [f.name for f in dataclasses.fields(cls)]
    for key in rest:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"{where}.{key}: unknown key for type {kind!r}; {hint}valid keys: {', '.join(allowed)}")
    params = section_from_dict(cls, rest, f"{where}.")
    return RegularizerConfig(index, kind, name, float(coefficient), tuple(hookpoints), schedule, params)


def regularizer_to_dict(reg: RegularizerConfig) -> dict[str, Any]:
    """The entry as a plain mapping (what RUN/config.yaml holds): type, name, coefficient,
    hookpoints, schedule and the type's keys, every value resolved; parses back to `reg`."""
    return {"type": reg.type, "name": reg.name, "coefficient": reg.coefficient,
            "hookpoints": list(reg.hookpoints), "schedule": dataclasses.asdict(reg.schedule),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(reg.params).items()}}


@register_config
@dataclass(frozen=True)
class TranscoderRegularizerConfig(SAERegularizerConfig):
    """Settings of `type: transcoder`: a (skip) transcoder from an MLP's input to its output
    (tti_dist/sae/transcoder.py), co-trained like `type: sae` (mode, recon_normalize, own
    Adam). Its hookpoints are exactly ["blocks.<i>.resid_mid", "blocks.<i>.mlp.out"] of one
    dense block: the input (the MLP sublayer's input, before its LayerNorm) and the target.
    Every SAE field applies; b_pre_init sets the decoder bias b_dec from the target's samples."""

    type_name = "transcoder"

    normalize_input: bool = True
    """Centre the MLP's input over d and scale it to unit norm per token before encoding (the
    MLP's LayerNorm without its affine map; the target is not normalised). Default true: the
    transcoder then does not depend on the residual stream's scale, which changes fast while
    the model trains."""

    skip: bool = False
    """Add the skip term W_skip x (W_skip [d, d], replicated over TP, initialised to 0):
    a skip transcoder (Paulo, Shabalin & Belrose 2025)."""
    normalize_decoder: bool = False
    """False (sparsify's transcoders): W_dec starts at 0 and is unconstrained. True (Dunefsky
    et al. 2024): W_dec starts from random unit columns, kept at unit norm (gradient
    projection before and renormalisation after each step), as an SAE's decoder."""
    b_dec_rate: float = 1.0
    """The output bias b_dec is not trained by gradient: every training micro-step sets
    b_dec <- (1 - rate) b_dec + rate b*, b* = the micro-batch's (all DP ranks) mean of
    y - W_dec f - W_skip x, the squared error's minimiser over the bias. 1 = an exact refit per
    micro-batch. It keeps up with the MLP output's mean, which moves with the model's own bias
    at the model's learning rate. In (0, 1]."""
