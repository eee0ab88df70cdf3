"""Tensor-parallel (skip) transcoder: an MLP's input mapped to its output through sparse latents.

Dunefsky, Chlenski & Nanda 2024, "Transcoders Find Interpretable LLM Feature Circuits";
Paulo, Shabalin & Belrose 2025, "Transcoders Beat Sparse Autoencoders for Interpretability"
(skip transcoders; EleutherAI's sparsify implements both). For block i, per token:

    x     = blocks.i.resid_mid          the MLP sublayer's input, before its LayerNorm
    pre   = W_enc x + b_enc             [n]   (no input-side bias: x is not centred)
    f     = activation(pre)             any SAE activation (tti_dist/sae/activations.py)
    y_hat = W_dec f + b_dec (+ W_skip x)
    y     = blocks.i.mlp.out            the target (replicated over TP)

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
term's share is computed whole on every rank and added once. W_skip's and b_dec's gradients
are identical on every TP rank (every loss on y_hat is replicated), so they need no
communication either.

Initialisation (sparsify's transcoders, `normalize_decoder: false`, the default): W_dec = 0,
so y_hat starts at b_dec and the FVU at 1; W_enc from the SAE's TP-independent random unit
rows; W_skip = 0. `init_biases(x, y)`: b_dec = the target's geometric median / mean (the
SAE's b_pre_init methods) and b_enc = -W_enc mean(x), so the pre-activations start centred
(sparsify does the same). The decoder is then unconstrained (no column normalisation, no
gradient projection). With `normalize_decoder: true` (Dunefsky et al.) W_dec starts from
random unit columns and is kept at unit norm exactly like an SAE's.

What differs from sparsify / Dunefsky et al.: the input is resid_mid, before the MLP's
LayerNorm (both read the LayerNorm's output), so the transcoder also learns the
normalisation: the one nonlinearity outside its latents that a replacement must absorb;
optional input normalisation is refused (it would change the replacement's input). Sparsify
trains on FVU with AuxK (k_aux = d/2, scaled by the dead count); here the SAE's objective
(recon_normalize, AuxK at aux_k / aux_coefficient, or L1 / L0 penalties) applies unchanged.
Metrics: tti_dist.sae.splice.transcoder_splice_metrics (FVU of y, L0, dead / dense fractions,
CE recovered when y_hat replaces the MLP's output).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tti_dist.config.sae import SAEConfig
from tti_dist.errors import ConfigError
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
    """

    def __init__(self, d_model: int, cfg: SAEConfig, tp_group: dist.ProcessGroup | None = None, tp_size: int = 1,
                 tp_rank: int = 0, seed: int = 0, *, skip: bool = False, normalize_decoder: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 sparse_decode: bool = True, dp_group: dist.ProcessGroup | None = None) -> None:
        if cfg.normalize_input:
            raise ConfigError("transcoder.normalize_input: True is not supported; the replacement must read the "
                              "MLP's input as it is (set it to false)")
        super().__init__(d_model, cfg, tp_group, tp_size, tp_rank, seed, device=device, dtype=dtype,
                         sparse_decode=sparse_decode, dp_group=dp_group)
        self.skip = skip
        self.unit_decoder = normalize_decoder
        if not normalize_decoder:
            with torch.no_grad():
                self.W_dec.zero_()
        if skip:
            self.W_skip = nn.Parameter(torch.zeros(d_model, d_model, device=device, dtype=dtype))  # replicated

    @property
    def b_dec(self) -> nn.Parameter:
        """The decoder bias (stored as ParallelSAE's b_pre, which the encoder does not use here)."""
        return self.b_pre

    def encode_pre(self, x_in: torch.Tensor) -> torch.Tensor:
        """Local pre-activations x W_enc^T + b_enc [..., n/tp]. Backward: the gradient of x is
        all-reduced over TP only when x requires grad (joint co-training)."""
        if x_in.requires_grad:
            x_in = self._tp_copy(x_in)
        return F.linear(x_in, self.W_enc, self.b_enc)

    def forward(self, x: torch.Tensor, inference: bool | None = None) -> SAEOutput:
        """y_hat (out.x_hat) for the MLP input x [..., d] (replicated over TP): the SAE's forward
        with this encoder, plus W_skip x on y_hat and on every matryoshka prefix."""
        out = super().forward(x, inference)
        if self.skip:
            skip = F.linear(out.x_in, self.W_skip)  # whole on every TP rank: no communication
            out.x_hat = out.x_hat + skip
            if out.x_hat_prefixes is not None:
                out.x_hat_prefixes = out.x_hat_prefixes + skip
        return out

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
        """Data-dependent biases from this DP rank's samples of input and target (all DP ranks'
        samples together: every estimate all-reduces its sums over dp_group):

            b_dec = geometric median / mean of y  (method, default cfg.b_pre_init; zeros: 0)
            b_enc = -W_enc mean(x)                 (centred pre-activations; not with zeros)

        Local in the latents (each rank centres its own rows), so no TP communication."""
        method = method or self.cfg.b_pre_init
        if method not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"init_biases: method {method!r}; allowed: 'geometric_median', 'mean', 'zeros'")
        if method == "zeros":
            self.b_pre.zero_()
            return
        y = y_samples.reshape(-1, self.d_model).to(torch.float64)
        x = x_samples.reshape(-1, self.d_model).to(torch.float64)
        self.b_pre.copy_(b_pre_estimate(y, method, dp_group, 32, 1e-8).to(self.b_pre.dtype))
        mean_x = b_pre_estimate(x, "mean", dp_group, 0, 1e-8)
        self.b_enc.copy_(-(self.W_enc.double() @ mean_x).to(self.b_enc.dtype))
