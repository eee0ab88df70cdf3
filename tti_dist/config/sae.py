"""Settings of one sparse autoencoder (`SAEConfig`) and the norm floor the SAE's modules share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from tti_dist.errors import ConfigError

NORM_EPS = 1e-12
"""Floor of every norm and variance the SAE divides by (unit decoder directions, normalised
inputs, normalised reconstruction losses): a zero vector stays zero instead of becoming NaN."""

RECON_NORMALIZATIONS = ("fvu", "token", "none", "input_norm")
"""Allowed normalisations of the SAE reconstruction term (ParallelSAE.reconstruction_loss)."""

ACTIVATIONS = ("topk", "relu", "batchtopk", "jumprelu", "matryoshka")
"""The SAE activations (tti_dist/sae/activations.py; docs/sae.md has one section each)."""

BATCH_SELECTIONS = ("batchtopk", "matryoshka")
"""Activations that select with BatchTopK and keep its running inference threshold."""

K_ACTIVATIONS = ("topk", "batchtopk", "matryoshka")
"""Activations whose sparsity is set by k (and which use AuxK)."""


@dataclass(frozen=True)
class SAEConfig:
    """Shape, activation and loss settings of one sparse autoencoder."""

    num_latents: int = 4096
    """Latents n of the whole SAE (all TP ranks together); must be divisible by tp_size.
    Typical: 8x to 64x the input width d."""
    activation: Literal["topk", "relu", "batchtopk", "jumprelu", "matryoshka"] = "topk"
    """"topk": f = ReLU(pre) on the k largest pre-activations of each token, 0 elsewhere
    (Gao et al. 2024); sparsity is set by k, no L1. "relu": f = ReLU(pre) with the
    decoder-norm-weighted L1 penalty (Bricken et al. 2023 / Anthropic's 2024 update).
    "batchtopk": ReLU of the k * B largest pre-activations of the whole micro-batch of B
    tokens; in eval a JumpReLU at a learned global threshold (Bussmann et al. 2024).
    "jumprelu": f = pre * H(pre - theta_i) with per-latent thresholds and an L0 penalty
    (Rajamanoharan et al. 2024). "matryoshka": BatchTopK selection, and the loss sums the
    reconstruction losses of the nested prefixes `matryoshka_prefixes` (Bussmann et al. 2025)."""
    k: int = 32
    """topk: active latents per token; batchtopk / matryoshka: mean active latents per token
    (k * B per micro-batch of B tokens). 1 <= k <= num_latents (ignored for relu and jumprelu)."""
    l1_coefficient: float = 5.0
    """relu only: weight of `l1_penalty` in `training_loss` (>= 0). The scale depends on the
    input scale: 5.0 is Anthropic's value for inputs scaled to E||x|| = sqrt(d)."""
    aux_k: int | None = 256
    """TopK auxiliary loss (AuxK): dead latents used per token to model the residual
    (Gao et al. use 512 at d = 768-ish widths; ~256 or d/2 is a good start).
    None means d // 2 (at least 1). Capped at num_latents. Must be >= 1."""
    aux_coefficient: float = 1.0 / 32.0
    """Weight of the AuxK loss in `training_loss` (>= 0; 0 disables it). Gao et al.: 1/32."""
    dead_window_tokens: int = 10_000_000
    """A latent is dead when it has not fired (f != 0) on any token of the global batch in
    this many tokens (summed over DP ranks). >= 1."""
    normalize_input: bool = False
    """Optional input preprocessing (Gao et al. 2024, section 2.1): each token is mean-centred
    over its d dimensions and scaled to unit L2 norm before encoding; the SAE then works in
    that space (out.x_in, out.x_hat). Stateless and replicated, so no communication."""
    b_pre_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """How `init_b_pre` sets b_pre from a sample of inputs: the geometric median (Weiszfeld
    iterations; Bricken et al. / Gao et al.), the mean, or zeros. Over all DP ranks' samples."""
    batchtopk_threshold_lr: float = 0.01
    """batchtopk / matryoshka: rate of the running estimate of the inference threshold,
    theta <- (1 - lr) theta + lr * (smallest positive selected activation of the batch);
    the first batch sets theta directly. SAELens's topk_threshold_lr (0.01). In (0, 1]."""
    l0_coefficient: float = 1e-3
    """jumprelu only: weight lambda of the L0 penalty mean_t sum_i H(pre - theta_i) in
    `training_loss` (>= 0). Its scale depends on the reconstruction term's (recon_normalize)."""
    jumprelu_bandwidth: float = 0.001
    """jumprelu only: width epsilon of the rectangle kernel of the straight-through estimator
    of the thresholds' gradient (Rajamanoharan et al. 2024: 0.001). > 0."""
    jumprelu_init_threshold: float = 0.001
    """jumprelu only: every theta_i = exp(log_threshold_i) starts here (the paper: 0.001). > 0."""
    matryoshka_prefixes: tuple[int, ...] = ()
    """matryoshka only: the nested dictionary sizes m_1 < m_2 < ... < m_G = num_latents
    (global latent counts; they need not align with TP shards). The loss is the sum over g
    of the reconstruction loss from the first m_g latents. Must be empty otherwise."""

    def resolved_aux_k(self, d_model: int) -> int:
        """The AuxK width actually used: aux_k (or d // 2 when None), capped at num_latents."""
        k = self.aux_k if self.aux_k is not None else max(1, d_model // 2)
        return min(k, self.num_latents)

    def validate(self, d_model: int, tp_size: int = 1, where: str = "sae") -> None:
        """Raise ConfigError (one line: field, value, what is allowed) on an invalid setting."""
        if d_model < 1:
            raise ConfigError(f"{where}: input width {d_model!r} must be >= 1")
        if not isinstance(self.num_latents, int) or self.num_latents < 2:
            raise ConfigError(f"{where}.num_latents: {self.num_latents!r} must be an integer >= 2")
        if tp_size < 1 or self.num_latents % tp_size:
            raise ConfigError(f"{where}.num_latents: {self.num_latents} must be divisible by tp_size {tp_size}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{where}.activation: {self.activation!r}; allowed: "
                              + ", ".join(repr(a) for a in ACTIVATIONS))
        if self.activation in K_ACTIVATIONS and not (isinstance(self.k, int) and 1 <= self.k <= self.num_latents):
            raise ConfigError(f"{where}.k: {self.k!r} must be an integer in 1..num_latents ({self.num_latents})")
        self._validate_family(where)
        if not (math.isfinite(self.l1_coefficient) and self.l1_coefficient >= 0):
            raise ConfigError(f"{where}.l1_coefficient: {self.l1_coefficient!r} must be a finite number >= 0")
        if self.aux_k is not None and self.aux_k < 1:
            raise ConfigError(f"{where}.aux_k: {self.aux_k!r} must be an integer >= 1 or null (d // 2)")
        if not (math.isfinite(self.aux_coefficient) and self.aux_coefficient >= 0):
            raise ConfigError(f"{where}.aux_coefficient: {self.aux_coefficient!r} must be a finite number >= 0")
        if self.dead_window_tokens < 1:
            raise ConfigError(f"{where}.dead_window_tokens: {self.dead_window_tokens!r} must be an integer >= 1")
        if self.b_pre_init not in ("geometric_median", "mean", "zeros"):
            raise ConfigError(f"{where}.b_pre_init: {self.b_pre_init!r}; allowed: 'geometric_median', 'mean', 'zeros'")

    def _validate_family(self, where: str) -> None:
        """The batchtopk / jumprelu / matryoshka settings (one-line ConfigError)."""
        lr = self.batchtopk_threshold_lr
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0 < lr <= 1):
            raise ConfigError(f"{where}.batchtopk_threshold_lr: {lr!r} must be a number in (0, 1]")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{where}.{name}: {value!r} must be a finite number > 0")
        if not (math.isfinite(self.l0_coefficient) and self.l0_coefficient >= 0):
            raise ConfigError(f"{where}.l0_coefficient: {self.l0_coefficient!r} must be a finite number >= 0")
        prefixes = list(self.matryoshka_prefixes)
        if self.activation != "matryoshka":
            if prefixes:
                raise ConfigError(f"{where}.matryoshka_prefixes: {prefixes!r} is only used with activation "
                                  f"'matryoshka' (activation is {self.activation!r}); leave it empty")
            return
        if not prefixes:
            raise ConfigError(f"{where}.matryoshka_prefixes: [] must list the nested dictionary sizes, strictly "
                              f"increasing and ending at num_latents ({self.num_latents}), e.g. "
                              f"[{self.num_latents // 4}, {self.num_latents}]")
        ok = all(isinstance(m, int) and not isinstance(m, bool) for m in prefixes)
        if not ok or prefixes[0] < 1 or any(b <= a for a, b in zip(prefixes, prefixes[1:])) \
                or prefixes[-1] != self.num_latents:
            raise ConfigError(f"{where}.matryoshka_prefixes: {prefixes!r} must be integers >= 1, strictly increasing "
                              f"and ending at num_latents ({self.num_latents})")
