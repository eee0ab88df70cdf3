"""Tensor-parallel sparse autoencoder (SAE): sharded latents, distributed TopK, exact at any TP degree.

Model (Bricken et al. 2023, "Towards Monosemanticity"; Gao et al. 2024, "Scaling and
evaluating sparse autoencoders"). For an input x in R^d (one token's activation at a site):

    pre   = W_enc (x - b_pre) + b_enc                  pre-activations, [n]
    f     = ReLU(pre)                                   activation: relu
    f     = ReLU(pre) * topk_mask(pre, k)               activation: topk (TopK on the
                                                        pre-activations, then ReLU; Gao et al.)
    x_hat = W_dec f + b_pre                             W_dec [d, n], columns = latent directions

b_pre is the pre-encoder bias: subtracted from the input and added back as the decoder's
bias. The decoder's columns are kept at unit norm (`remove_parallel_gradient` before the
optimizer step, `normalize_decoder` after it), so a latent's activation is its coefficient
along a unit direction and the L1 / AuxK terms cannot be gamed by rescaling.

Tensor parallelism. The n latents are split contiguously over the TP group: TP rank r holds
latents [r n/tp, (r+1) n/tp) as W_enc [n/tp, d], b_enc [n/tp], W_dec [d, n/tp]; b_pre [d] is
replicated. The input x is replicated across TP (it is a residual-stream activation, or any
activation gathered to full width). Per forward:
  - encoder: local, no communication (a column-parallel linear). Its backward all-reduces
    over TP the gradient of its replicated input: b_pre's d floats, or, when x itself
    requires grad (joint co-training), the [tokens, d] input gradient.
  - TopK: `topk_mask` over the TP group, exactly the TP=1 selection (ties to the lower global
    latent index): one all-gather of tokens x min(k, n/tp) values.
  - decoder: each rank decodes its latents, the partial reconstructions are summed with
    megatron's `reduce_from_tensor_model_parallel_region` (all-reduce forward, identity
    backward): one all-reduce of [tokens, d]. The identity backward is exact because every
    loss on x_hat is computed identically on all TP ranks (replicated), so each rank's
    upstream gradient is already the full gradient.
All losses are scalars replicated across TP and equal to the TP=1 values; the gradients of
each rank's shards equal the matching slices of the TP=1 gradients (tests/distributed/test_sae_parallel.py).

Initialisation does not depend on tp_size: the decoder directions of latents [c C, (c+1) C)
(chunks of C = 1024 latents) are drawn from a private torch.Generator seeded from
(seed, c), normalized to unit columns, and W_enc = W_dec^T (Gao et al.); each rank draws
only the chunks that overlap its slice. b_enc = 0, b_pre = 0 until `init_b_pre`. The global
RNG is never touched.

Co-training with the LM (the `sae` regularizer, its own optimizer and live metrics) is in
tti_dist/regularizers/sae.py; docs/sae.md lists what is not built yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tti_dist.errors import ConfigError
from tti_dist.models.sparsity import _splitmix64, topk_mask

INIT_CHUNK_LATENTS = 1024
"""Latents per private-generator draw at initialisation (part of the init's definition:
changing it changes the weights a seed produces)."""

_NORM_EPS = 1e-12


@dataclass(frozen=True)
class SAEConfig:
    """Shape, activation and loss settings of one sparse autoencoder."""

    num_latents: int = 4096
    """Latents n of the whole SAE (all TP ranks together); must be divisible by tp_size.
    Typical: 8x to 64x the input width d."""
    activation: Literal["topk", "relu"] = "topk"
    """"topk": f = ReLU(pre) on the k largest pre-activations of each token, 0 elsewhere
    (Gao et al. 2024); sparsity is set by k, no L1. "relu": f = ReLU(pre) with the
    decoder-norm-weighted L1 penalty (Bricken et al. 2023 / Anthropic's 2024 update)."""
    k: int = 32
    """topk only: active latents per token, 1 <= k <= num_latents (ignored for relu)."""
    l1_coefficient: float = 5.0
    """relu only: weight of `l1_penalty` in `training_loss` (>= 0). The scale depends on the
    input scale: 5.0 is Anthropic's value for inputs scaled to E||x|| = sqrt(d)."""
    aux_k: int | None = 256
    """TopK auxiliary loss (AuxK): dead latents used per token to model the residual
    (Gao et al. use 512 at d = 768-ish widths; DESIGN.md section 4 says ~256 or d/2).
    None means d // 2 (at least 1). Capped at num_latents. Must be >= 1."""
    aux_coefficient: float = 1.0 / 32.0
    """Weight of the AuxK loss in `training_loss` (>= 0; 0 disables it). Gao et al.: 1/32."""
    dead_window_tokens: int = 10_000_000
    """A latent is dead when it has not fired (f != 0) on any token of the global batch in
    this many tokens (summed over DP ranks); DESIGN.md section 4 default 10M. >= 1."""
    normalize_input: bool = False
    """Optional input preprocessing (Gao et al. 2024, section 2.1): each token is mean-centred
    over its d dimensions and scaled to unit L2 norm before encoding; the SAE then works in
    that space (out.x_in, out.x_hat). Stateless and replicated, so no communication."""
    b_pre_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """How `init_b_pre` sets b_pre from a sample of inputs: the geometric median (Weiszfeld
    iterations; Bricken et al. / Gao et al.), the mean, or zeros. Over all DP ranks' samples."""

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
        if self.activation not in ("topk", "relu"):
            raise ConfigError(f"{where}.activation: {self.activation!r}; allowed: 'topk', 'relu'")
        if self.activation == "topk" and not 1 <= self.k <= self.num_latents:
            raise ConfigError(f"{where}.k: {self.k!r} must be in 1..num_latents ({self.num_latents})")
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


@dataclass
class SAEOutput:
    """What `ParallelSAE.forward` returns (local = this TP rank's latents, replicated = same on all TP ranks)."""

    x_in: torch.Tensor
    """The SAE's input after preprocessing [..., d], replicated: x itself (cast to the SAE's
    dtype) unless normalize_input. Losses compare x_hat against this."""
    pre: torch.Tensor
    """Local pre-activations [..., n/tp] (with autograd graph)."""
    latents: torch.Tensor
    """Local latent activations f [..., n/tp], >= 0; for topk at most k nonzero per token
    over all TP ranks together."""
    x_hat: torch.Tensor
    """Reconstruction [..., d], replicated."""
    mask: torch.Tensor | None
    """topk: local bool mask [..., n/tp] of the k selected latents (before the ReLU, so a
    selected latent with pre <= 0 has f = 0); None for relu."""


class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward all-reduces (SUM) the gradient over the TP group.

    For a replicated tensor feeding a column-parallel computation: each TP rank's backward
    yields only its latents' share of the gradient. (megatron's copy_to_tensor_model_parallel_region
    does the same but all-reduces `grad.contiguous()` in place and returns `grad`, which loses
    the result for a non-contiguous gradient; this version always returns the reduced tensor.)
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _init_decoder_rows(num_latents: int, d_model: int, seed: int, lo: int, hi: int) -> torch.Tensor:
    """Unit-norm decoder directions of latents [lo, hi) as rows [hi - lo, d] (fp32, CPU)."""
    rows = []
    for chunk in range(lo // INIT_CHUNK_LATENTS, (hi - 1) // INIT_CHUNK_LATENTS + 1):
        start = chunk * INIT_CHUNK_LATENTS
        size = min(INIT_CHUNK_LATENTS, num_latents - start)
        gen = torch.Generator(device="cpu").manual_seed(_splitmix64(_splitmix64(seed) ^ chunk) >> 1)
        block = torch.randn(size, d_model, generator=gen, dtype=torch.float32)
        rows.append(block[max(lo - start, 0): min(hi - start, size)])
    w = torch.cat(rows)
    return w / w.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)


class ParallelSAE(nn.Module):
    """A sparse autoencoder whose latents are sharded contiguously over the TP group (see module docstring).

    Args:
        d_model: input width d.
        cfg: the SAE's settings (validated here against d_model and tp_size).
        tp_group: the tensor-parallel group (required when tp_size > 1).
        tp_size: ranks sharing the latents.
        tp_rank: this rank's index in tp_group; it holds latents [tp_rank n/tp, (tp_rank+1) n/tp).
        seed: initialisation seed (the weights do not depend on tp_size).
        device, dtype: of the parameters (fp32 recommended; inputs are cast to dtype).
        sparse_decode: topk only: decode from the selected latents with an embedding-bag
            (see `decode`) instead of the dense [tokens, n/tp] x [n/tp, d] product.
    """

    def __init__(
        self,
        d_model: int,
        cfg: SAEConfig,
        tp_group: dist.ProcessGroup | None = None,
        tp_size: int = 1,
        tp_rank: int = 0,
        seed: int = 0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        sparse_decode: bool = True,
    ) -> None:
        super().__init__()
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        cfg.validate(d_model, tp_size)
        if tp_size > 1 and tp_group is None:
            raise ValueError(f"ParallelSAE: tp_size {tp_size} needs tp_group")
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"ParallelSAE: tp_rank {tp_rank} not in 0..{tp_size - 1}")
        self.cfg = cfg
        self.d_model = d_model
        self.tp_group, self.tp_size, self.tp_rank = tp_group, tp_size, tp_rank
        self.num_local_latents = cfg.num_latents // tp_size
        self.latent_offset = tp_rank * self.num_local_latents
        self.sparse_decode = sparse_decode
        self.aux_k = cfg.resolved_aux_k(d_model)
        rows = _init_decoder_rows(cfg.num_latents, d_model, seed, self.latent_offset,
                                  self.latent_offset + self.num_local_latents)
        kw = dict(device=device, dtype=dtype)
        self.W_enc = nn.Parameter(rows.clone().to(**kw))  # [n/tp, d]
        self.b_enc = nn.Parameter(torch.zeros(self.num_local_latents, **kw))  # [n/tp]
        self.W_dec = nn.Parameter(rows.t().contiguous().to(**kw))  # [d, n/tp]
        self.b_pre = nn.Parameter(torch.zeros(d_model, **kw))  # [d], replicated
        set_tensor_model_parallel_attributes(self.W_enc, True, 0, 1)
        set_tensor_model_parallel_attributes(self.b_enc, True, 0, 1)
        set_tensor_model_parallel_attributes(self.W_dec, True, 1, 1)

    # ------------------------------------------------------------------ communication helpers

    def _tp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group, identity backward (megatron's reduce_from_tensor_model_parallel_region)."""
        if self.tp_size == 1:
            return t
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        # megatron all-reduces input.contiguous() in place and returns the input: pass a contiguous tensor.
        return reduce_from_tensor_model_parallel_region(t.contiguous(), group=self.tp_group)

    def _tp_copy(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.tp_size == 1 else _CopyToTP.apply(t, self.tp_group)

    # ------------------------------------------------------------------ forward

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """x cast to the SAE's dtype; with normalize_input, mean-centred over d and scaled to unit norm."""
        x = x.to(self.W_enc.dtype)
        if not self.cfg.normalize_input:
            return x
        xc = x - x.mean(dim=-1, keepdim=True)
        return xc / xc.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)

    def encode_pre(self, x_in: torch.Tensor) -> torch.Tensor:
        """Local pre-activations (x_in - b_pre) W_enc^T + b_enc, [..., n/tp]; x_in already preprocessed.

        Backward: the gradient of the replicated input is all-reduced over TP (each rank only
        holds its latents' share): b_pre's d floats when x_in needs no gradient, else the
        whole [tokens, d] gradient of x_in - b_pre.
        """
        if x_in.requires_grad:
            centred = self._tp_copy(x_in - self.b_pre)
        else:
            centred = x_in - self._tp_copy(self.b_pre)
        return F.linear(centred, self.W_enc, self.b_enc)

    def decode(self, f: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """W_dec f summed over TP (no b_pre): [rows, n/tp] local latents -> [rows, d] replicated.

        idx: optional [rows, m] local latent indices covering every nonzero of f (other
        entries may be listed if f is 0 there). With idx the decode is an embedding-bag,
        sum_j f[t, idx_tj] W_dec[:, idx_tj]: O(rows m d) work and a [n/tp, d] transposed copy of
        W_dec (d n/tp floats moved) instead of the dense O(rows n/tp d) product; the backward
        scatters into W_dec's gradient only at the listed latents. Without idx: the dense
        product F.linear(f, W_dec).
        """
        if idx is None:
            part = F.linear(f, self.W_dec)
        else:
            weights = f.gather(-1, idx)
            part = F.embedding_bag(idx, self.W_dec.t().contiguous(), per_sample_weights=weights, mode="sum")
        return self._tp_sum(part)

    def _selected_index(self, pre: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
        """[rows, min(k, n/tp)] local indices whose first entries are the selected latents of each row."""
        key = pre.detach().masked_fill(~mask, float("-inf"))
        return torch.topk(key, min(k, key.shape[-1]), dim=-1, sorted=False).indices

    def forward(self, x: torch.Tensor) -> SAEOutput:
        """Encode and decode x [..., d] (replicated across TP). See the module docstring for the formulas."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"ParallelSAE: input width {x.shape[-1]} != d_model {self.d_model}")
        x_in = self.preprocess(x)
        lead = x_in.shape[:-1]
        pre = self.encode_pre(x_in.reshape(-1, self.d_model))
        relu = F.relu(pre)
        mask = None
        idx = None
        if self.cfg.activation == "topk":
            mask = topk_mask(pre, self.cfg.k, by="value", tp_group=self.tp_group, tp_size=self.tp_size,
                             tp_rank=self.tp_rank)
            f = torch.where(mask, relu, torch.zeros((), dtype=relu.dtype, device=relu.device))
            if self.sparse_decode:
                idx = self._selected_index(pre, mask, self.cfg.k)
        else:
            f = relu
        x_hat = self.decode(f, idx) + self.b_pre
        n_l = self.num_local_latents
        return SAEOutput(
            x_in=x_in,
            pre=pre.view(*lead, n_l),
            latents=f.view(*lead, n_l),
            x_hat=x_hat.view(*lead, self.d_model),
            mask=None if mask is None else mask.view(*lead, n_l),
        )

    # ------------------------------------------------------------------ losses (replicated scalars)

    @staticmethod
    def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, normalize: str = "none") -> torch.Tensor:
        """Reconstruction error in the SAE's input space (x: out.x_in); a replicated scalar.

        normalize="none":  mean_t ||x_t - x_hat_t||^2
        normalize="token": mean_t ||x_t - x_hat_t||^2 / ||x_t||^2 (denominator floored at
            1e-12): the per-token normalized MSE, invariant to the activations' scale.
        normalize="fvu":   sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean_t' x_t'||^2, the
            fraction of variance unexplained of these tokens (= 1 - EV of DESIGN.md section 4
            on the micro-batch). Invariant to scale AND to a shared offset, so in joint
            co-training the model can lower it neither by shrinking its activations nor by
            collapsing the tokens towards their mean (which "token" allows: its denominator
            is dominated by the shared mean).
        x and x_hat are replicated across TP: no communication.
        """
        x = x.to(x_hat.dtype)
        err = (x - x_hat).pow(2).sum(dim=-1)
        if normalize == "token":
            return (err / x.pow(2).sum(dim=-1).clamp_min(_NORM_EPS)).mean()
        if normalize == "fvu":
            flat = x.reshape(-1, x.shape[-1])
            variance = (flat - flat.mean(dim=0, keepdim=True)).pow(2).sum()
            return err.sum() / variance.clamp_min(_NORM_EPS)
        if normalize != "none":
            raise ValueError(f"reconstruction_loss: normalize={normalize!r}; allowed: none, token, fvu")
        return err.mean()

    def l1_penalty(self, out: SAEOutput) -> torch.Tensor:
        """Decoder-norm-weighted L1: mean over tokens of sum_i f_i ||W_dec[:, i]||_2 (all n latents).

        Each rank sums its latents; one scalar all-reduce over TP (reduce_from_tensor_model_parallel_region,
        identity backward). With unit-norm decoder columns it is the plain L1 of f.
        """
        f = out.latents.reshape(-1, self.num_local_latents)
        norms = self.W_dec.norm(dim=0)
        local = (f * norms).sum() / f.shape[0]
        return self._tp_sum(local)

    def aux_k_loss(self, x: torch.Tensor, out: SAEOutput, dead_mask: torch.Tensor) -> torch.Tensor:
        """AuxK (Gao et al. 2024; DESIGN.md section 4): the dead latents' top-k_aux reconstruction of the residual.

            e      = x - x_hat                        (detached: a fixed target, as in Gao et al.)
            f_aux  = ReLU(pre) on the top-k_aux pre-activations among dead latents, 0 elsewhere
            e_hat  = W_dec f_aux                      (no bias)
            loss   = sum_t ||e_t - e_hat_t||^2 / sum_t ||e_t - mean_t' e_t'||^2

        over this rank's tokens (a ratio of batch sums: the FVU of the residual; under DP each
        rank's loss is its local batch's ratio and DeepSpeed averages the gradients). k_aux =
        min(cfg's aux_k, n); the top-k_aux is the distributed `topk_mask` over the TP group
        on pre with non-dead latents keyed -inf, so it equals the TP=1 selection; when fewer
        than k_aux latents are dead, all dead ones are used. Exactly 0 when no latent is
        dead on any TP rank (a where() on an all-reduced count, no host sync; the work is
        still done) and when the denominator is 0.

        Args:
            x: the SAE's input (out.x_in) [..., d].
            out: this step's forward output (its pre carries the graph).
            dead_mask: local bool [n/tp] (FiringTracker.dead_mask()).
        Communication: the top-k all-gather (tokens x min(k_aux, n/tp) values), one
        all-reduce of [tokens, d] (e_hat) and one of an int64 scalar (the dead count).
        """
        n_l = self.num_local_latents
        dead = dead_mask.to(device=out.pre.device, dtype=torch.bool).reshape(n_l)
        pre = out.pre.reshape(-1, n_l)
        with torch.no_grad():
            num_dead = dead.sum().to(torch.int64)
            if self.tp_size > 1:
                dist.all_reduce(num_dead, op=dist.ReduceOp.SUM, group=self.tp_group)
        key = pre.detach().masked_fill(~dead, float("-inf"))
        sel = topk_mask(key, self.aux_k, by="value", tp_group=self.tp_group, tp_size=self.tp_size,
                        tp_rank=self.tp_rank) & dead
        f_aux = torch.where(sel, F.relu(pre), torch.zeros((), dtype=pre.dtype, device=pre.device))
        idx = self._selected_index(pre, sel, self.aux_k) if self.sparse_decode else None
        e_hat = self.decode(f_aux, idx)
        e = (x.to(out.x_hat.dtype) - out.x_hat).detach().reshape(-1, self.d_model)
        num = (e - e_hat).pow(2).sum()
        den = (e - e.mean(dim=0, keepdim=True)).pow(2).sum()
        ok = (num_dead > 0) & (den > 0)
        loss = num / torch.where(ok, den, torch.ones_like(den))  # no 0/0, so no NaN in the backward either
        return torch.where(ok, loss, torch.zeros_like(loss))

    def training_loss(
        self, x: torch.Tensor, out: SAEOutput, dead_mask: torch.Tensor | None = None, normalize: str = "none"
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The SAE objective and its parts (replicated scalars; parts detached).

        topk: reconstruction + aux_coefficient * aux_k_loss (AuxK only when dead_mask is given
        and aux_coefficient > 0). relu: reconstruction + l1_coefficient * l1_penalty.
        Parts: "mse" (reconstruction_loss with `normalize`), "aux_k", "l1".
        """
        recon = self.reconstruction_loss(x, out.x_hat, normalize)
        parts = {"mse": recon.detach()}
        total = recon
        if self.cfg.activation == "relu":
            l1 = self.l1_penalty(out)
            total = total + self.cfg.l1_coefficient * l1
            parts["l1"] = l1.detach()
        elif dead_mask is not None and self.cfg.aux_coefficient > 0:
            aux = self.aux_k_loss(x, out, dead_mask)
            total = total + self.cfg.aux_coefficient * aux
            parts["aux_k"] = aux.detach()
        return total, parts

    # ------------------------------------------------------------------ decoder constraint

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Project each decoder column's gradient onto the column's orthogonal complement, in place.

        g_i -= (g_i . w_i) w_i / ||w_i||^2 (= (g_i . w_i) w_i for unit columns): the first-order
        change of ||w_i|| is then 0. Call after backward, before the optimizer step. Local
        (each rank owns its columns whole), no communication; a no-op without a gradient.
        """
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        coef = (g * w).sum(dim=0) / (w * w).sum(dim=0).clamp_min(_NORM_EPS)
        g.sub_(w * coef)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder column to unit L2 norm, in place (after the optimizer step). Local."""
        self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp_min(_NORM_EPS))

    # ------------------------------------------------------------------ b_pre initialisation

    @torch.no_grad()
    def init_b_pre(
        self,
        x_samples: torch.Tensor,
        method: str | None = None,
        dp_group: dist.ProcessGroup | None = None,
        num_iters: int = 32,
        eps: float = 1e-8,
    ) -> torch.Tensor:
        """Set b_pre from sample inputs of ALL DP ranks; returns the new b_pre.

        x_samples [..., d] are this DP rank's samples (raw inputs; preprocessed here like
        forward's input). method (default cfg.b_pre_init):
          "zeros"            b_pre = 0.
          "mean"             b_pre = (sum over all ranks' samples of x) / (their count).
          "geometric_median" argmin_y sum_i ||x_i - y||, by Weiszfeld's iterations from the
                             mean: y <- sum_i w_i x_i / sum_i w_i, w_i = 1 / max(||x_i - y||, eps),
                             num_iters times (a fixed count, so every rank stops together).
        Every sum is all-reduced over dp_group (one all-reduce of d + 1 float64 per
        iteration), so the result equals the value on the concatenated samples. Samples are
        replicated across TP, so every TP rank computes the same b_pre without TP
        communication. Computed in float64. Rank sample counts may differ (even 0 on a
        rank); the total must be > 0.
        """
        method = method or self.cfg.b_pre_init
        if method not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"init_b_pre: method {method!r}; allowed: 'geometric_median', 'mean', 'zeros'")
        if method == "zeros":
            self.b_pre.zero_()
            return self.b_pre.detach().clone()
        x = self.preprocess(x_samples).reshape(-1, self.d_model).to(torch.float64)

        def weighted_mean(w: torch.Tensor | None) -> torch.Tensor:
            if w is None:
                stats = torch.cat([x.sum(dim=0), x.new_tensor([x.shape[0]])])
            else:
                stats = torch.cat([(w[:, None] * x).sum(dim=0), w.sum().reshape(1)])
            if dp_group is not None:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=dp_group)
            return stats[:-1] / stats[-1]

        y = weighted_mean(None)
        if not torch.isfinite(y).all():
            raise ValueError("init_b_pre: no samples on any DP rank (or non-finite samples)")
        if method == "geometric_median":
            for _ in range(num_iters):
                w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
                y = weighted_mean(w)
        self.b_pre.copy_(y.to(self.b_pre.dtype))
        return self.b_pre.detach().clone()


class FiringTracker:
    """Tokens since each local latent last fired, counted in GLOBAL tokens (all DP ranks).

    Definition: a latent fires on a token when f != 0. After each `update` (one micro-batch
    per DP rank), with T = the tokens of that micro-batch summed over the DP group and
    fired_i = "latent i fired on some token of some DP rank":
        tokens_since_fired_i <- 0                          if fired_i
        tokens_since_fired_i <- tokens_since_fired_i + T   otherwise
    and `dead_mask()` = tokens_since_fired >= dead_window_tokens: a latent is alive while it
    fired on ANY DP rank within the last window of global tokens (granularity: one update;
    a latent that fired counts as having fired at the update's last token). New latents
    start at 0, i.e. alive for the first window (as in Gao et al.).

    The counts are identical on every DP rank of a TP rank's latents (one all-reduce SUM over
    dp_group of n/tp + 1 int64 per update: the per-latent firing-token counts and the token
    count, 8 (n/tp + 1) bytes), and each TP rank tracks its own n/tp latents (no TP
    communication). The per-latent firing-token counts also accumulate into `density()`,
    the share of global tokens on which each latent fired since the last `reset_density()`.
    State (checkpointed via state_dict) is local: a shard along dim 0 of the global [n] vectors.
    """

    def __init__(
        self,
        num_local_latents: int,
        dead_window_tokens: int,
        dp_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if dead_window_tokens < 1:
            raise ValueError(f"FiringTracker: dead_window_tokens {dead_window_tokens!r} must be >= 1")
        self.dead_window_tokens = int(dead_window_tokens)
        self.dp_group = dp_group
        self.tokens_since_fired = torch.zeros(num_local_latents, dtype=torch.int64, device=device)
        self.fire_counts = torch.zeros(num_local_latents, dtype=torch.int64, device=device)
        self.num_tokens = torch.zeros((), dtype=torch.int64, device=device)
        # Host-side count of global tokens seen (local tokens x dp_size per update, i.e. equal
        # micro-batches on every DP rank, as the trainer guarantees): until it reaches the
        # window no latent can be dead, which callers can know without a device sync.
        self.tokens_seen = 0
        self._dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1

    def may_have_dead(self) -> bool:
        """False while fewer than dead_window_tokens global tokens were seen (no latent can be
        dead yet); a host-side check, no device sync."""
        return self.tokens_seen >= self.dead_window_tokens

    @torch.no_grad()
    def update(self, latents: torch.Tensor) -> None:
        """Record one micro-batch: latents [..., n/tp] (this DP rank's tokens)."""
        n_l = self.tokens_since_fired.numel()
        f = latents.detach().reshape(-1, n_l)
        packed = torch.cat([(f != 0).sum(dim=0).to(torch.int64),
                            torch.tensor([f.shape[0]], dtype=torch.int64, device=f.device)])
        packed = packed.to(self.tokens_since_fired.device)
        if self.dp_group is not None:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.dp_group)
        counts, tokens = packed[:-1], packed[-1]
        self.tokens_seen += f.shape[0] * self._dp_size
        self.tokens_since_fired.add_(tokens).masked_fill_(counts > 0, 0)
        self.fire_counts.add_(counts)
        self.num_tokens.add_(tokens)

    def dead_mask(self) -> torch.Tensor:
        """Local bool [n/tp]: True where the latent has not fired in the last dead_window_tokens global tokens."""
        return self.tokens_since_fired >= self.dead_window_tokens

    def density(self) -> torch.Tensor:
        """Local float [n/tp]: share of global tokens since reset_density() on which each latent fired."""
        return self.fire_counts.double() / self.num_tokens.clamp_min(1).double()

    def reset_density(self) -> None:
        """Start a new density window (e.g. at each log step); dead tracking is unaffected."""
        self.fire_counts.zero_()
        self.num_tokens.zero_()

    def state_dict(self) -> dict:
        """Local counters (copies)."""
        return {"tokens_since_fired": self.tokens_since_fired.clone(), "fire_counts": self.fire_counts.clone(),
                "num_tokens": self.num_tokens.clone(), "dead_window_tokens": self.dead_window_tokens,
                "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        """Restore counters saved by `state_dict` (same local latent count)."""
        if state["tokens_since_fired"].shape != self.tokens_since_fired.shape:
            raise ValueError(f"FiringTracker: state for {state['tokens_since_fired'].numel()} latents, "
                             f"this tracker has {self.tokens_since_fired.numel()}")
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.fire_counts.copy_(state["fire_counts"])
        self.num_tokens.copy_(state["num_tokens"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
