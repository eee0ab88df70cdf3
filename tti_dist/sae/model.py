"""Tensor-parallel sparse autoencoder (SAE): sharded latents, distributed TopK, exact at any TP degree.

Model (Bricken et al. 2023, "Towards Monosemanticity"; Gao et al. 2024, "Scaling and
evaluating sparse autoencoders"). For an input x in R^d (one token's activation at a site):

    pre   = W_enc (x - b_pre) + b_enc                  pre-activations, [n]
    f     = ReLU(pre)                                   activation: relu
    f     = ReLU(pre) * topk_mask(pre, k)               activation: topk (TopK on the
                                                        pre-activations, then ReLU; Gao et al.)
    f     = batchtopk, jumprelu, matryoshka             tti_dist/sae/activations.py (formulas,
                                                        papers, communication)
    x_hat = W_dec f + b_pre                             W_dec [d, n], columns = latent directions

matryoshka also forms the prefix reconstructions x_hat_g = W_dec[:, :m_g] f[:m_g] + b_pre
(`SAEOutput.x_hat_prefixes`) and its loss sums their reconstruction losses. batchtopk and
matryoshka keep the running inference threshold as the buffer `batchtopk_threshold`
(updated by every training-mode forward, averaged over `dp_group`); jumprelu's thresholds
are the parameter `log_threshold` [n/tp], sharded like b_enc.

b_pre is the pre-encoder bias: subtracted from the input and added back as the decoder's
bias. The decoder's columns are kept at unit norm (`remove_parallel_gradient` before the
optimizer step, `normalize_decoder` after it), so a latent's activation is its coefficient
along a unit direction and the L1 / AuxK terms cannot be gamed by rescaling.

Tensor parallelism. The n latents are split contiguously over the TP group: TP rank r holds
latents [r n/tp, (r+1) n/tp) as W_enc [n/tp, d], b_enc [n/tp], W_dec [d, n/tp]; b_pre [d] is
replicated. The input x is replicated across TP (it is a residual-stream activation, or any
activation gathered to full width). Per forward:
  - encoder: local, no communication (a column-parallel linear). Its backward all-reduces
    over TP the gradient of its replicated input (`copy_with_summed_grad`): b_pre's d
    floats, or, when x itself requires grad (joint co-training), the [tokens, d] input gradient.
  - TopK: `topk_mask` over the TP group, exactly the TP=1 selection (ties to the lower global
    latent index): one all-gather of tokens x min(k, n/tp) values.
  - decoder: each rank decodes its latents, the partial reconstructions are summed with
    `sum_with_identity_grad` (all-reduce forward, identity backward): one all-reduce of
    [tokens, d]. The identity backward is exact because every loss on x_hat is computed
    identically on all TP ranks (replicated), so each rank's upstream gradient is already
    the full gradient.
All losses are scalars replicated across TP and equal to the TP=1 values; the gradients of
each rank's shards equal the matching slices of the TP=1 gradients (tests/distributed/test_sae_parallel.py).

Initialisation does not depend on tp_size (tti_dist/sae/initialisation.py): unit decoder
directions from private generators, one per chunk of latents, and W_enc = W_dec^T (Gao et
al.). b_enc = 0, b_pre = 0 until `init_b_pre`. The global RNG is never touched. Settings:
tti_dist/config/sae.py; dead latents and firing density: tti_dist/sae/firing_tracker.py.

Co-training with the LM (the `sae` regularizer, its own optimizer and live metrics) is in
tti_dist/regularizers/sae.py; docs/sae.md lists what is not built yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tti_dist.distributed.collectives import copy_with_summed_grad, sum_with_identity_grad
from tti_dist.models.sparsity import topk_mask
from tti_dist.config.sae import BATCH_SELECTIONS, K_ACTIVATIONS, NORM_EPS, RECON_NORMALIZATIONS, SAEConfig
from tti_dist.sae.activations import (
    TPShard,
    activate,
    group_partial_decodes,
    jumprelu_l0,
    prefix_slices,
    selected_index,
    update_threshold,
)
from tti_dist.sae.initialisation import b_pre_estimate, init_decoder_rows


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
    selected latent with pre <= 0 has f = 0); batchtopk / matryoshka: the batch selection in
    training, the open gates pre > theta in eval; jumprelu: the open gates; None for relu."""
    x_hat_prefixes: torch.Tensor | None = None
    """matryoshka: [G, ..., d] replicated, the reconstructions from the first m_g latents
    (b_pre included; the last is x_hat). None otherwise."""


def input_norm(x: torch.Tensor) -> torch.Tensor:
    """mean_t ||x_t||_2 over all tokens of x [..., d], floored at NORM_EPS (Lai et al.'s x_norm)."""
    return x.norm(dim=-1).mean().clamp_min(NORM_EPS)


def _mark_tp_sharded(param: nn.Parameter, partition_dim: int) -> None:
    """The attributes megatron's TP layers put on a sharded parameter (its
    set_tensor_model_parallel_attributes), read by `tp_partition_dims` and the checkpoint
    export. Set here directly: importing the SAE (as every regularizer import does) must not
    import megatron-core, which `tti train` loads only after the config was checked."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = 1


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
        sparse_decode: topk / batchtopk: decode from the selected latents with an
            embedding-bag (see `decode`) instead of the dense [tokens, n/tp] x [n/tp, d] product.
        dp_group: batchtopk / matryoshka: the DP group over which the running threshold's
            batch minima are averaged (None: one DP rank).
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
        dp_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
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
        rows = init_decoder_rows(cfg.num_latents, d_model, seed, self.latent_offset,
                                  self.latent_offset + self.num_local_latents)
        kw = dict(device=device, dtype=dtype)
        self.W_enc = nn.Parameter(rows.clone().to(**kw))  # [n/tp, d]
        self.b_enc = nn.Parameter(torch.zeros(self.num_local_latents, **kw))  # [n/tp]
        self.W_dec = nn.Parameter(rows.t().contiguous().to(**kw))  # [d, n/tp]
        self.b_pre = nn.Parameter(torch.zeros(d_model, **kw))  # [d], replicated
        _mark_tp_sharded(self.W_enc, 0)
        _mark_tp_sharded(self.b_enc, 0)
        _mark_tp_sharded(self.W_dec, 1)
        self.dp_group = dp_group
        self._tp = TPShard(tp_group, tp_size, tp_rank)
        if cfg.activation == "jumprelu":  # theta_i = exp(log_threshold_i), sharded like b_enc
            init = math.log(cfg.jumprelu_init_threshold)
            self.log_threshold = nn.Parameter(torch.full((self.num_local_latents,), init, **kw))
            _mark_tp_sharded(self.log_threshold, 0)
        if cfg.activation in BATCH_SELECTIONS:  # replicated; float64 as SAELens (EMA of small steps); -1 = unset
            self.register_buffer("batchtopk_threshold", torch.tensor(-1.0, dtype=torch.float64, device=device))
        self._prefix_slices = (prefix_slices(tuple(cfg.matryoshka_prefixes), self.latent_offset,
                                             self.num_local_latents) if cfg.activation == "matryoshka" else None)

    # ------------------------------------------------------------------ communication helpers

    def _tp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group, identity backward (`sum_with_identity_grad`)."""
        return t if self.tp_size == 1 else sum_with_identity_grad(t, self.tp_group)

    def _tp_copy(self, t: torch.Tensor) -> torch.Tensor:
        """Identity, all-reduce of the gradient over the TP group (`copy_with_summed_grad`)."""
        return t if self.tp_size == 1 else copy_with_summed_grad(t, self.tp_group)

    # ------------------------------------------------------------------ forward

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """x cast to the SAE's dtype; with normalize_input, mean-centred over d and scaled to unit norm."""
        x = x.to(self.W_enc.dtype)
        if not self.cfg.normalize_input:
            return x
        xc = x - x.mean(dim=-1, keepdim=True)
        return xc / xc.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)

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

    def forward(self, x: torch.Tensor, inference: bool | None = None) -> SAEOutput:
        """Encode and decode x [..., d] (replicated across TP). See the module docstring for the formulas.

        inference (default: not self.training) selects batchtopk / matryoshka's eval form, the
        JumpReLU at the running threshold; a training-mode forward of those updates the
        threshold (`update_threshold`: one all-reduce MIN over TP, one of 2 float64 over DP),
        so every DP rank must run it the same number of times.
        """
        if x.shape[-1] != self.d_model:
            raise ValueError(f"ParallelSAE: input width {x.shape[-1]} != d_model {self.d_model}")
        training = self.training if inference is None else not inference
        x_in = self.preprocess(x)
        lead = x_in.shape[:-1]
        pre = self.encode_pre(x_in.reshape(-1, self.d_model))
        act = activate(pre, self.cfg, self._tp, training=training,
                       threshold=getattr(self, "batchtopk_threshold", None),
                       log_threshold=getattr(self, "log_threshold", None), sparse=self.sparse_decode)
        if act.batch_min is not None:
            update_threshold(self.batchtopk_threshold, act.batch_min, self.cfg.batchtopk_threshold_lr, self.dp_group)
        f = act.latents
        prefixes = None
        if self._prefix_slices is not None:
            # one all-reduce of the stacked per-group partial decodes, then the running sum over groups
            parts = self._tp_sum(group_partial_decodes(f, self.W_dec, self._prefix_slices))
            prefixes = parts.cumsum(dim=0) + self.b_pre
            x_hat = prefixes[-1]
        else:
            x_hat = self.decode(f, act.idx) + self.b_pre
        n_l = self.num_local_latents
        return SAEOutput(
            x_in=x_in,
            pre=pre.view(*lead, n_l),
            latents=f.view(*lead, n_l),
            x_hat=x_hat.view(*lead, self.d_model),
            mask=None if act.mask is None else act.mask.view(*lead, n_l),
            x_hat_prefixes=None if prefixes is None else prefixes.view(-1, *lead, self.d_model),
        )

    # ------------------------------------------------------------------ losses (replicated scalars)

    @staticmethod
    def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, normalize: str = "none") -> torch.Tensor:
        """Reconstruction error in the SAE's input space (x: out.x_in); a replicated scalar.

        normalize="none":  mean_t ||x_t - x_hat_t||^2
        normalize="token": mean_t ||x_t - x_hat_t||^2 / ||x_t||^2 (denominator floored at
            1e-12): the per-token normalized MSE, invariant to the activations' scale.
        normalize="fvu":   sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean_t' x_t'||^2, the
            fraction of variance unexplained of these tokens (= 1 - explained variance,
            tti_dist.sae.metrics.explained_variance, on the micro-batch). Invariant to scale
            AND to a shared offset, so in joint co-training the model can lower it neither by
            shrinking its activations nor by collapsing the tokens towards their mean (which
            "token" allows: its denominator is dominated by the shared mean).
        normalize="input_norm": mean_t ||x_t - x_hat_t||^2 / mean_t ||x_t||_2, Lai et al.'s
            normalisation for joint SAE training (gpt-circuits, training/sae/regularization.py,
            "scale losses based on MSE by input norms to avoid weight shrinkage"): a squared
            error over an unsquared norm, so it still scales linearly with the activations;
            the gradient flows through the denominator too, as in their code.
        x and x_hat are replicated across TP: no communication.
        """
        x = x.to(x_hat.dtype)
        err = (x - x_hat).pow(2).sum(dim=-1)
        if normalize == "input_norm":
            return err.mean() / input_norm(x)
        if normalize == "token":
            return (err / x.pow(2).sum(dim=-1).clamp_min(NORM_EPS)).mean()
        if normalize == "fvu":
            flat = x.reshape(-1, x.shape[-1])
            variance = (flat - flat.mean(dim=0, keepdim=True)).pow(2).sum()
            return err.sum() / variance.clamp_min(NORM_EPS)
        if normalize != "none":
            raise ValueError(f"reconstruction_loss: normalize={normalize!r}; allowed: {', '.join(RECON_NORMALIZATIONS)}")
        return err.mean()

    def l1_penalty(self, out: SAEOutput) -> torch.Tensor:
        """Decoder-norm-weighted L1: mean over tokens of sum_i f_i ||W_dec[:, i]||_2 (all n latents).

        Each rank sums its latents; one scalar all-reduce over TP (sum_with_identity_grad,
        identity backward). With unit-norm decoder columns it is the plain L1 of f.
        """
        f = out.latents.reshape(-1, self.num_local_latents)
        norms = self.W_dec.norm(dim=0)
        local = (f * norms).sum() / f.shape[0]
        return self._tp_sum(local)

    def aux_k_loss(
        self, x: torch.Tensor, out: SAEOutput, dead_mask: torch.Tensor, normalize: str = "fvu"
    ) -> torch.Tensor:
        """AuxK (Gao et al. 2024): the dead latents' top-k_aux reconstruction of the residual.

            e      = x - x_hat                        (detached: a fixed target, as in Gao et al.)
            f_aux  = ReLU(pre) on the top-k_aux pre-activations among dead latents, 0 elsewhere
            e_hat  = W_dec f_aux                      (no bias)
            loss   = sum_t ||e_t - e_hat_t||^2 / sum_t ||e_t - mean_t' e_t'||^2
            (normalize="input_norm": mean_t ||e_t - e_hat_t||^2 / mean_t ||x_t||_2 instead, the
             normalisation Lai et al. apply to their aux term; any other value: the FVU above)

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
        idx = selected_index(pre, sel, self.aux_k) if self.sparse_decode else None
        e_hat = self.decode(f_aux, idx)
        e = (x.to(out.x_hat.dtype) - out.x_hat).detach().reshape(-1, self.d_model)
        num = (e - e_hat).pow(2).sum()
        if normalize == "input_norm":
            num = num / e.shape[0]
            den = input_norm(x.to(out.x_hat.dtype))
        else:
            den = (e - e.mean(dim=0, keepdim=True)).pow(2).sum()
        ok = (num_dead > 0) & (den > 0)
        loss = num / torch.where(ok, den, torch.ones_like(den))  # no 0/0, so no NaN in the backward either
        return torch.where(ok, loss, torch.zeros_like(loss))

    def l0_penalty(self, out: SAEOutput) -> torch.Tensor:
        """jumprelu: lambda's term mean_t sum_i H(pre - theta_i) with the STE gradient to the
        thresholds (tti_dist.sae.activations.jumprelu_l0; one scalar all-reduce over TP)."""
        return jumprelu_l0(out.pre.reshape(-1, self.num_local_latents), self.log_threshold,
                           self.cfg.jumprelu_bandwidth, self._tp)

    def matryoshka_loss(self, x: torch.Tensor, out: SAEOutput, normalize: str = "none") -> torch.Tensor:
        """sum_g R(x, x_hat_g) over the prefixes m_1 < ... < m_G = n (the last is the full
        reconstruction): Bussmann et al. 2025's nested loss, a sum as in their paper and
        SAELens's matryoshka_batchtopk. Replicated; no communication beyond the forward's."""
        return sum(self.reconstruction_loss(x, xg, normalize) for xg in out.x_hat_prefixes.unbind(0))

    def training_loss(
        self, x: torch.Tensor, out: SAEOutput, dead_mask: torch.Tensor | None = None, normalize: str = "none"
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The SAE objective and its parts (replicated scalars; parts detached).

        topk / batchtopk: reconstruction + aux_coefficient * aux_k_loss (AuxK only when
        dead_mask is given and aux_coefficient > 0). relu: reconstruction + l1_coefficient *
        l1_penalty. jumprelu: reconstruction + l0_coefficient * l0_penalty. matryoshka: the
        sum of the prefixes' reconstruction losses (`matryoshka_loss`) + AuxK.
        Parts: "mse" (the full reconstruction's reconstruction_loss with `normalize`), "aux_k",
        "l1", "l0_penalty", "matryoshka_inner" (sum of the inner prefixes' losses).
        """
        recon = self.reconstruction_loss(x, out.x_hat, normalize)
        parts = {"mse": recon.detach()}
        total = recon
        if self.cfg.activation == "matryoshka":
            inner = sum((self.reconstruction_loss(x, xg, normalize) for xg in out.x_hat_prefixes.unbind(0)[:-1]),
                        torch.zeros_like(recon))
            total = total + inner
            parts["matryoshka_inner"] = inner.detach()
        if self.cfg.activation == "relu":
            l1 = self.l1_penalty(out)
            total = total + self.cfg.l1_coefficient * l1
            parts["l1"] = l1.detach()
        elif self.cfg.activation == "jumprelu":
            l0 = self.l0_penalty(out)
            total = total + self.cfg.l0_coefficient * l0
            parts["l0_penalty"] = l0.detach()
        elif dead_mask is not None and self.cfg.aux_coefficient > 0 and self.cfg.activation in K_ACTIVATIONS:
            aux = self.aux_k_loss(x, out, dead_mask, normalize)
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
        coef = (g * w).sum(dim=0) / (w * w).sum(dim=0).clamp_min(NORM_EPS)
        g.sub_(w * coef)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder column to unit L2 norm, in place (after the optimizer step). Local."""
        self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp_min(NORM_EPS))

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
        forward's input). method (default cfg.b_pre_init): "zeros" (b_pre = 0), or "mean" /
        "geometric_median" of all DP ranks' samples (tti_dist.sae.initialisation.b_pre_estimate,
        formulas there; one all-reduce of d + 1 float64 per iteration over dp_group), so the
        result equals the value on the concatenated samples. Samples are replicated across
        TP, so every TP rank computes the same b_pre without TP communication. Computed in
        float64. Rank sample counts may differ (even 0 on a rank); the total must be > 0.
        """
        method = method or self.cfg.b_pre_init
        if method not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"init_b_pre: method {method!r}; allowed: 'geometric_median', 'mean', 'zeros'")
        if method == "zeros":
            self.b_pre.zero_()
            return self.b_pre.detach().clone()
        x = self.preprocess(x_samples).reshape(-1, self.d_model).to(torch.float64)
        y = b_pre_estimate(x, method, dp_group, num_iters, eps)
        self.b_pre.copy_(y.to(self.b_pre.dtype))
        return self.b_pre.detach().clone()
