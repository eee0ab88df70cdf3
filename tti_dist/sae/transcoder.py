"""Tensor-parallel (skip) transcoder: an MLP's input mapped to its output through sparse latents.

Dunefsky, Chlenski & Nanda 2024, "Transcoders Find Interpretable LLM Feature Circuits";
Paulo, Shabalin & Belrose 2025, "Transcoders Beat Sparse Autoencoders for Interpretability"
(skip transcoders; EleutherAI's sparsify implements both). For block i, per token:

    x     = blocks.i.resid_mid          the MLP sublayer's input, before its LayerNorm
    pre   = W_enc x + b_enc             [n]   (no input-side bias: x is not centred)
    f     = activation(pre)             any SAE activation (tti_dist/sae/activations.py)
    y_hat = W_dec f + b_dec (+ W_skip x)
    y     = blocks.i.mlp.out            the target (replicated over TP)

computed in the transcoder's own units: x enters as input_scale x and y_hat leaves divided by
target_scale, two fixed scalars set from the first batch (`init_biases`: E||x|| and E||y||
become sqrt(d)), so that Adam's learning rate means the same at any activation scale. With
`normalize_input` (the default of `type: transcoder` and of `tti sae fit --target`) x is
first centred over d and scaled to unit norm per token: the MLP's own LayerNorm without its
affine map (which the linear encoder absorbs) and eps, so the transcoder reads what the MLP
reads and is immune to the residual stream's scale, which moves fast while a model trains
(co-trained on resid_mid as it is, a transcoder of a young model diverged: EV -700 after 6
steps). Only the input is normalised; y_hat stays in the target's units.

`ParallelTranscoder` is a `ParallelSAE` whose encoder reads x without subtracting a bias and
whose b_pre plays b_dec (the decoder bias only); the activation, the decoder, the losses
(called with the target y in place of the SAE's input: `training_loss(y, out, ...)`, so the
reconstruction term, AuxK's residual e = y - y_hat, the matryoshka prefixes all compare
with y) and the TP layout are the SAE's. `out.x_in` is the input x, `out.x_hat` is y_hat.

Tensor parallelism: latents sharded contiguously as in ParallelSAE (W_enc [n/tp, d], b_enc
[n/tp], W_dec [d, n/tp] on rank r for latents [r n/tp, (r+1) n/tp)); b_dec and W_skip [d, d]
are replicated. Communication per forward: the activation's own (TopK / BatchTopK
all-gathers) and one all-reduce of the [tokens, d] decoder partials; nothing else. Backward:
the encoder needs no all-reduce when x carries no gradient (no b_pre in the encoder, unlike
the SAE, whose b_pre gradient is summed over TP); in joint co-training, where x requires
grad, the encoder's share of dL/dx is all-reduced over TP ([tokens, d]), while the skip
term's share is computed whole on every rank and added once. W_skip's (and a
gradient-trained b_dec's) gradients are identical on every TP rank (every loss on y_hat is
replicated), so they need no communication either.

The output bias b_dec (`b_dec_rate`, default 1 in `type: transcoder` and `tti sae fit`) is
not trained by gradient: every training forward given the target sets it, before the loss,
to the batch-optimal bias with the other parameters fixed,

    b*    = mean over the micro-batch's tokens (all DP ranks) of (y - W_dec f - W_skip x)
    b_dec <- (1 - b_dec_rate) b_dec + b_dec_rate b*

(the minimiser over b of sum_t ||y_t - y_hat_t||^2, in the transcoder's units), with no
gradient through it and b_dec outside the optimizer. Why: co-trained with a young model, the
MLP output's mean moves with the model's own fc2 bias, at the model's learning rate (|mean y|
0.035 -> 0.6 in 12 steps while its spread stayed ~0.04); an Adam-trained b_dec, moving about
lr per step in the transcoder's units, lagged far behind and the live EV of y fell to -250
within 12 steps. Communication: none over TP (y and the summed decode are replicated, so
every TP rank computes the same b*); one all-reduce of d + 1 float64 over DP per training
forward, so all DP ranks keep identical b_dec. Inference forwards (the replacement metrics,
`tti eval`) use the running value. b_dec stays in the state dict (a parameter without
gradient).

Initialisation (sparsify's transcoders, `normalize_decoder: false`, the default): W_dec = 0,
so y_hat starts at b_dec and the FVU at 1; W_enc from the SAE's TP-independent random unit
rows; W_skip = 0. `init_biases(x, y)`: the two scales, b_dec = the (scaled) target's
geometric median / mean (the SAE's b_pre_init methods) and b_enc = -W_enc mean(scaled x), so
the pre-activations start centred (sparsify does the same). The decoder is then unconstrained (no column normalisation, no
gradient projection). With `normalize_decoder: true` (Dunefsky et al.) W_dec starts from
random unit columns and is kept at unit norm exactly like an SAE's.

What differs from sparsify / Dunefsky et al.: b_dec refitted per batch (both train it by
gradient descent, on a frozen model); the fixed scales (sparsify trains on raw
activations, Dunefsky et al. on raw ones too); the input is resid_mid, before the MLP's
LayerNorm (both read the LayerNorm's output), so the transcoder also learns the
normalisation: the one nonlinearity outside its latents that a replacement must absorb;
the per-token normalisation stands in for the LayerNorm (sparsify and Dunefsky et al. read
its output, affine included). Sparsify
trains on FVU with AuxK (k_aux = d/2, scaled by the dead count); here the SAE's objective
(recon_normalize, AuxK at aux_k / aux_coefficient, or L1 / L0 penalties) applies unchanged.
Metrics: tti_dist.sae.splice.transcoder_splice_metrics (FVU of y, L0, dead / dense fractions,
CE recovered when y_hat replaces the MLP's output).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tti_dist.config.sae import SAEConfig
from tti_dist.sae.initialisation import b_pre_estimate
from tti_dist.sae.model import ParallelSAE, SAEOutput


def transcoder_sites(block: int) -> tuple[str, str]:
    """(input, target) hookpoints of the transcoder of block `block`'s MLP."""
    return f"blocks.{block}.resid_mid", f"blocks.{block}.mlp.out"


def metric_prefix(block: int) -> str:
    """Tag prefix of a transcoder's splice and ground-truth metrics: transcoder/blocks.<i>.mlp/."""
    return f"transcoder/blocks.{block}.mlp/"


def shard_name(tp_rank: int) -> str:
    """The file of TP rank `tp_rank`'s shard of a `tti sae fit --target` transcoder: the SAE
    shard format (tti_dist.sae.files.write_shard / read_shard) under a name of its own, so that
    readers of SAE shards (tti inspect --sae, tti sae export) do not take it for an SAE."""
    return f"transcoder_tp_rank{tp_rank:02d}.safetensors"


class ParallelTranscoder(ParallelSAE):
    """A (skip) transcoder with latents sharded over the TP group (see the module docstring).

    Args: those of ParallelSAE (d_model = the width of input and target), plus
        skip: add W_skip x (W_skip [d, d], replicated, starts at 0).
        normalize_decoder: keep W_dec's columns at unit norm (and start them random) instead
            of sparsify's zero-initialised, unconstrained decoder.
        b_dec_rate: in (0, 1]: b_dec is refitted to the batch-optimal bias by every training
            forward given the target (`refit_b_dec`) and gets no gradient; None: b_dec is an
            ordinary parameter trained by the optimizer (sparsify, Dunefsky et al.).
    """

    def __init__(self, d_model: int, cfg: SAEConfig, tp_group: dist.ProcessGroup | None = None, tp_size: int = 1,
                 tp_rank: int = 0, seed: int = 0, *, skip: bool = False, normalize_decoder: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 sparse_decode: bool = True, dp_group: dist.ProcessGroup | None = None,
                 b_dec_rate: float | None = None) -> None:
        super().__init__(d_model, cfg, tp_group, tp_size, tp_rank, seed, device=device, dtype=dtype,
                         sparse_decode=sparse_decode, dp_group=dp_group)
        self.skip = skip
        self.unit_decoder = normalize_decoder
        if not normalize_decoder:
            with torch.no_grad():
                self.W_dec.zero_()
        if skip:
            self.W_skip = nn.Parameter(torch.zeros(d_model, d_model, device=device, dtype=dtype))  # replicated
        # Fixed input / target scales (set by init_biases; 1 until then), replicated buffers.
        self.register_buffer("input_scale", torch.ones((), device=device, dtype=dtype))
        self.register_buffer("target_scale", torch.ones((), device=device, dtype=dtype))
        if b_dec_rate is not None and not 0 < b_dec_rate <= 1:
            raise ValueError(f"ParallelTranscoder: b_dec_rate {b_dec_rate!r} must be in (0, 1] or None")
        self.b_dec_rate = b_dec_rate
        if b_dec_rate is not None:  # refitted in the forward, not by the optimizer: no gradient at all
            self.b_pre.requires_grad_(False)

    @property
    def b_dec(self) -> nn.Parameter:
        """The decoder bias (stored as ParallelSAE's b_pre, which the encoder does not use here)."""
        return self.b_pre

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """The input in the transcoder's own space: x cast to its dtype (with normalize_input:
        centred over d and scaled to unit norm per token), times input_scale."""
        return super().preprocess(x) * self.input_scale

    def encode_pre(self, x_in: torch.Tensor) -> torch.Tensor:
        """Local pre-activations x W_enc^T + b_enc [..., n/tp]. Backward: the gradient of x is
        all-reduced over TP only when x requires grad (joint co-training)."""
        if x_in.requires_grad:
            x_in = self._tp_copy(x_in)
        return F.linear(x_in, self.W_enc, self.b_enc)

    def forward(self, x: torch.Tensor, inference: bool | None = None,
                target: torch.Tensor | None = None) -> SAEOutput:
        """y_hat (out.x_hat, in the target's own units) for the MLP input x [..., d] (replicated
        over TP): the SAE's forward on x_s = input_scale x (out.x_in) with this encoder, plus
        W_skip x_s, divided by target_scale; the same for every matryoshka prefix.

        target: the target y [..., d] of a training forward. With b_dec_rate set, a
        training-mode forward (inference False) given the target first refits b_dec
        (`refit_b_dec`) and returns y_hat with the refitted bias; an inference forward, or
        one without target, uses b_dec as it is."""
        out = super().forward(x, inference)
        skip = F.linear(out.x_in, self.W_skip) if self.skip else 0.0  # whole on every TP rank: no communication
        training = self.training if inference is None else not inference
        shift = 0.0
        if self.b_dec_rate is not None and training and target is not None:
            shift = self.refit_b_dec(target, out.x_hat.detach() + (skip.detach() if self.skip else 0.0))
        out.x_hat = (out.x_hat + skip + shift) / self.target_scale
        if out.x_hat_prefixes is not None:
            out.x_hat_prefixes = (out.x_hat_prefixes + skip + shift) / self.target_scale
        return out

    @torch.no_grad()
    def refit_b_dec(self, y: torch.Tensor, y_hat_s: torch.Tensor) -> torch.Tensor:
        """Move b_dec towards the batch-optimal decoder bias; returns the change [d].

            b*    = mean over the micro-batch's tokens of all DP ranks of
                    (target_scale y - W_dec f - W_skip x_s)   (the transcoder's units)
            b_dec <- (1 - b_dec_rate) b_dec + b_dec_rate b*

        b* minimises sum_t ||y_t - y_hat_t||^2 over the bias with the other parameters fixed
        (so also the FVU, whose denominator does not depend on it). y_hat_s is the scaled
        prediction with the current b_dec (W_dec f + b_dec + W_skip x_s), so
        b* - b_dec = mean(target_scale y - y_hat_s). Computed in float64. y and the summed
        decode are replicated over TP, so every TP rank computes the same b*; the token sums
        are all-reduced over dp_group (d + 1 float64), so every DP rank keeps the same b_dec.
        No gradient: b_dec is excluded from the optimizer (requires_grad False)."""
        resid = (y.to(torch.float64) * self.target_scale.double() - y_hat_s.to(torch.float64)).reshape(-1, self.d_model)
        sums = torch.cat([resid.sum(dim=0), resid.new_tensor([float(resid.shape[0])])])
        if self.dp_group is not None:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.dp_group)
        delta = (self.b_dec_rate * sums[:-1] / sums[-1].clamp_min(1.0)).to(self.b_pre.dtype)
        self.b_pre.add_(delta)
        return delta

    def training_loss(self, x: torch.Tensor, out: SAEOutput, dead_mask: torch.Tensor | None = None,
                      normalize: str = "none") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The SAE objective with the target y (x here) and y_hat, both taken into the
        transcoder's own units (times target_scale), where AuxK's W_dec f_aux lives: every term
        as ParallelSAE.training_loss (an FVU is the same in either units)."""
        s = self.target_scale
        prefixes = None if out.x_hat_prefixes is None else out.x_hat_prefixes * s
        scaled = dataclasses.replace(out, x_hat=out.x_hat * s, x_hat_prefixes=prefixes)
        return super().training_loss(x.to(out.x_hat.dtype) * s, scaled, dead_mask, normalize)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """The SAE's decoder-gradient projection, only with normalize_decoder."""
        if self.unit_decoder:
            super().remove_parallel_gradient()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder columns, only with normalize_decoder."""
        if self.unit_decoder:
            super().normalize_decoder()

    @torch.no_grad()
    def init_b_pre(self, x_samples, method=None, dp_group=None, num_iters: int = 32, eps: float = 1e-8):
        raise TypeError("ParallelTranscoder: use init_biases(x, y), which also centres the encoder")

    @torch.no_grad()
    def init_biases(self, x_samples: torch.Tensor, y_samples: torch.Tensor, method: str | None = None,
                    dp_group: dist.ProcessGroup | None = None) -> None:
        """Scales and biases from this DP rank's samples of input and target (all DP ranks'
        samples together: every estimate all-reduces its sums over dp_group):

            input_scale  = sqrt(d) / mean_t ||x_t||,  target_scale = sqrt(d) / mean_t ||y_t||
            b_dec = geometric median / mean of target_scale y  (method, default cfg.b_pre_init;
                    zeros: 0)
            b_enc = -W_enc mean(input_scale x)       (centred pre-activations; zeros: 0)

        The scales put input and target at E||.|| = sqrt(d) (SAELens's
        expected_average_only_in normalisation), so the learning rate means the same at any
        activation scale: the decoder starts at 0 and Adam moves each weight by about lr per
        step whatever the target's units (a tiny model's MLP output, norm ~0.04, diverged at
        lr 1e-3 without them). Local in the latents (each rank centres its own rows), so no
        TP communication."""
        method = method or self.cfg.b_pre_init
        if method not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"init_biases: method {method!r}; allowed: 'geometric_median', 'mean', 'zeros'")
        y = y_samples.reshape(-1, self.d_model).to(torch.float64)
        x = ParallelSAE.preprocess(self, x_samples).reshape(-1, self.d_model).to(torch.float64)
        norms = torch.stack([x.norm(dim=1).sum(), y.norm(dim=1).sum(), x.new_tensor(float(x.shape[0]))])
        if dp_group is not None:
            dist.all_reduce(norms, op=dist.ReduceOp.SUM, group=dp_group)
        root_d = self.d_model ** 0.5
        self.input_scale.fill_(root_d * norms[2].item() / max(norms[0].item(), 1e-12))
        self.target_scale.fill_(root_d * norms[2].item() / max(norms[1].item(), 1e-12))
        if method == "zeros":
            self.b_pre.zero_()
            self.b_enc.zero_()
            return
        y = y * self.target_scale.double()
        self.b_pre.copy_(b_pre_estimate(y, method, dp_group, 32, 1e-8).to(self.b_pre.dtype))
        mean_x = b_pre_estimate(x * self.input_scale.double(), "mean", dp_group, 0, 1e-8)
        self.b_enc.copy_(-(self.W_enc.double() @ mean_x).to(self.b_enc.dtype))
