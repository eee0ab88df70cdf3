"""A stochastic (variational) bottleneck on the residual stream, latents split across TP ranks.

Placed in block i when model.bottleneck_layer == i, after that block's `resid_post`:

    h      = LayerNorm(x)                                   x: [.., d] residual stream (replicated)
    mu     = ColumnParallelLinear(d, z)(h)                  [.., z/tp] this rank's latents
    logvar = ColumnParallelLinear(d, z)(h)                  [.., z/tp] the same latents' log-variances
    z      = mu + exp(logvar / 2) * eps,  eps ~ N(0, I)     while training (reparameterisation)
    z      = mu                                             in eval mode
    out    = RowParallelLinear(z, d)(z)                     [.., d] replicated; REPLACES the stream

so everything downstream of block i sees only dec(z): a true bottleneck of z latents, the
encoder q(z|x) = N(mu(x), diag exp(logvar(x))) of a VAE (Kingma & Welling 2014, "Auto-Encoding
Variational Bayes"); the `kl` and `total_correlation` regularizers put its prior terms on it
(beta-VAE, Higgins et al. 2017; beta-TCVAE, Chen et al. 2018).

Tensor parallelism: mu and logvar are two column-parallel layers (not one fused one), so TP
rank r holds mu and logvar of the same contiguous latent slice [r z/tp, (r+1) z/tp); the
decoder is row-parallel over that slice and all-reduces its partial products. The noise eps
is drawn at FULL width [.., z] from the global RNG and each rank keeps its slice: the ranks
of a TP group share the runtime seed (utils/seeding.py), so TP=2 draws exactly the noise of
TP=1 and the model is the same function at every TP degree.

Hookpoints (in data-flow order): `bottleneck.mu`, `bottleneck.logvar`, `bottleneck.z`
(TP-sharded, global width z) and `bottleneck.out` (replicated, width d).

Initialisation (why): the encoder reads a LayerNorm of the stream, as every reader of the
residual stream in this pre-norm model does, so its input has unit scale per coordinate at
any depth; mu's weight is N(0, 1/d), which makes mu ~ N(0, 1) per latent at init, the scale
of the N(0, I) prior the KL pulls towards (with the GPT's init_std it would be ~init_std
sqrt(d), width dependent). logvar's weight starts at zero and its bias at
LOGVAR_BIAS_INIT = -4 (posterior std e^-2 ~ 0.14): the posterior noise starts an order of
magnitude below the signal, so the channel carries information from the first step instead
of drowning the stream in unit noise; the KL term then raises logvar where the task allows.
logvar always has this bias, also with model.bias: false (without it no input-independent
variance could be learned, and the noise would start at std ~1). The decoder's weight is
N(0, init_std^2 / z): with z ~ N(0, 1) the new stream dec(z) starts at the per-coordinate
scale init_std of the token embedding, the scale the blocks downstream were initialised for.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from tti_dist.capture.hookpoints import HookPoint
from tti_dist.config.schema import ModelConfig
from tti_dist.models.parallel_linear import ColumnLinear, RowLinear

LOGVAR_BIAS_INIT = -4.0
"""Initial bias of the logvar layer (its weight starts at 0): posterior std exp(-2) at init."""


def _init(std: float):
    def init(tensor: torch.Tensor) -> torch.Tensor:
        if std == 0.0:
            return nn.init.zeros_(tensor)
        return nn.init.normal_(tensor, mean=0.0, std=std)

    return init


class ParallelBottleneck(nn.Module):
    """Gaussian bottleneck x -> z ~ N(mu(x), diag exp(logvar(x))) -> dec(z), latents TP-split.

    Args:
        cfg: model config (hidden_size, bottleneck_dim, bias, layernorm_eps, init_std).
        mp_config: the megatron config the block's other layers use.
        tp_group: the tensor-parallel group (bottleneck_dim must be divisible by its size).
    """

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, tp_group):
        super().__init__()
        d, dim = cfg.hidden_size, cfg.bottleneck_dim
        self.tp_size = dist.get_world_size(tp_group)
        self.tp_rank = dist.get_rank(tp_group)
        assert dim % self.tp_size == 0, (dim, self.tp_size)  # validated in config/validate.py
        self.dim = dim
        self.dim_local = dim // self.tp_size
        # Modules are registered in data-flow order, so list_hookpoints follows the forward.
        self.ln = nn.LayerNorm(d, eps=cfg.layernorm_eps, bias=cfg.bias)
        self.enc_mu = ColumnLinear(
            d, dim, config=mp_config, init_method=_init(1.0 / math.sqrt(d)),
            bias=cfg.bias, gather_output=False, tp_group=tp_group,
        )
        self.hook_mu = HookPoint(dim, tp_sharded=True)
        self.enc_logvar = ColumnLinear(
            d, dim, config=mp_config, init_method=_init(0.0),
            bias=True, gather_output=False, tp_group=tp_group,
        )
        with torch.no_grad():
            self.enc_logvar.bias.fill_(LOGVAR_BIAS_INIT)
        self.hook_logvar = HookPoint(dim, tp_sharded=True)
        self.hook_z = HookPoint(dim, tp_sharded=True)
        self.dec = RowLinear(
            dim, d, config=mp_config, init_method=_init(cfg.init_std / math.sqrt(dim)),
            bias=cfg.bias, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )
        self.hook_out = HookPoint(d, tp_sharded=False)

    def sample_noise(self, like_BTZ: torch.Tensor) -> torch.Tensor:
        """This rank's slice of full-width N(0, I) noise [.., z] from the global RNG (fp32)."""
        full = torch.randn(*like_BTZ.shape[:-1], self.dim, device=like_BTZ.device, dtype=torch.float32)
        lo = self.tp_rank * self.dim_local
        return full[..., lo:lo + self.dim_local]

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h = self.ln(x_BTD)
        mu, _ = self.enc_mu(h)
        mu = self.hook_mu(mu)
        logvar, _ = self.enc_logvar(h)
        logvar = self.hook_logvar(logvar)
        if self.training:
            eps = self.sample_noise(mu).to(mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * eps
        else:
            z = mu
        z = self.hook_z(z)
        out, _ = self.dec(z)
        return self.hook_out(out)

