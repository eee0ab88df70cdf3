"""Transcoder co-training (`type: transcoder`): a TP-sharded (skip) transcoder of one MLP, trained alongside the LM.

Config entry (one transcoder per entry; the hookpoints are the MLP's input and output of one
dense block, in that order):

    {type: transcoder, name: tc1, coefficient: 1.0,
     hookpoints: ["blocks.1.resid_mid", "blocks.1.mlp.out"], skip: true,
     num_latents: 1024, activation: topk, k: 16, lr: 1e-3}

Everything but the two sites is `type: sae`'s (tti_dist/regularizers/sae.py): the same modes,
objective (with the MLP's output y as the target), own Adam stepped in
`after_optimizer_step`, metrics and checkpoint state. See docs/sae.md, "Transcoders".
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re

import torch

from tti_dist.config.regularizers import TranscoderRegularizerConfig
from tti_dist.config.schema import ModelConfig
from tti_dist.errors import ConfigError
from tti_dist.regularizers.base import Regularizer, register
from tti_dist.regularizers.sae import SAECoTraining
from tti_dist.sae.firing_tracker import FiringTracker
from tti_dist.sae.splice import transcoder_splice_metrics
from tti_dist.sae.transcoder import ParallelTranscoder, metric_prefix, transcoder_sites

logger = logging.getLogger(__name__)

_INPUT = re.compile(r"^blocks\.(\d+)\.resid_mid$")


def transcoder_block(hookpoints: list[str], where: str) -> int:
    """The block i of hookpoints == [blocks.i.resid_mid, blocks.i.mlp.out]; one-line ConfigError otherwise."""
    match = _INPUT.match(hookpoints[0]) if len(hookpoints) == 2 else None
    if match is None or list(hookpoints) != list(transcoder_sites(int(match.group(1)))):
        raise ConfigError(f"{where}.hookpoints: matches {list(hookpoints)}; type 'transcoder' takes exactly the "
                          "MLP's input and output of one dense block, e.g. "
                          "[\"blocks.1.resid_mid\", \"blocks.1.mlp.out\"]")
    return int(match.group(1))


@register
class TranscoderCoTraining(SAECoTraining):
    """A tensor-parallel (skip) transcoder (tti_dist.sae.transcoder.ParallelTranscoder) of block
    i's MLP, co-trained with the LM.

    Source: Dunefsky, Chlenski & Nanda 2024 (transcoders); Paulo, Shabalin & Belrose 2025
    (skip transcoders). Per micro-step on the captured x = blocks.i.resid_mid and
    y = blocks.i.mlp.out [B, T, d] (replicated over TP):
        y_hat = transcoder(x)                      (fp32, autocast off)
        L = R(y, y_hat) + the activation's term (AuxK with e = y - y_hat, L1, L0 penalty,
            matryoshka prefixes), R set by recon_normalize (default fvu: 1 - EV of y)
    One torch.autograd.grad of L gives the transcoder's parameter gradients (accumulated into
    .grad) and, in joint mode, g_x = dL/dx and g_y = dL/dy; the returned loss is
      joint:    L + <x, g_x> + <y, g_y> - (the same).detach()   (the model gets coefficient x
                schedule x both gradients; the transcoder none through this value)
      detached: L.detach().
    Its own Adam steps in `after_optimizer_step` (micro-step mean, DP mean, Adam; the decoder
    projection and renormalisation only with normalize_decoder), exactly as `type: sae`, for
    every parameter but b_dec: the forward first refits b_dec to the micro-batch's optimal
    output bias, b_dec <- (1 - b_dec_rate) b_dec + b_dec_rate mean_t(y - W_dec f - W_skip x)
    (ParallelTranscoder.refit_b_dec), so that it keeps up with the MLP output's mean, which
    moves with the model's own bias at the model's learning rate.

    Communication per micro-step: the transcoder's forward (activation all-gathers, the
    decoder all-reduce of 4 T d bytes, the b_dec refit's DP all-reduce of 8 (d + 1) bytes),
    in joint mode the encoder's input-gradient all-reduce (4 T d bytes; none in detached
    mode), the metrics' TP all-reduce of 4 float64 and the firing tracker's DP all-reduce;
    per optimizer step one DP all-reduce of the local gradients (4 (2 n d / tp + n / tp
    (+ d^2 with skip)) bytes payload).

    Metrics (reg/<name>/*): those of `type: sae`, with explained_variance, shrinkage and
    recon_loss of the target y. At eval steps `transcoder/blocks.<i>.mlp/*`
    (tti_dist.sae.splice.transcoder_splice_metrics: CE recovered when y_hat replaces the
    MLP's output, FVU of y, L0, dead and dense fractions).
    """

    Config = TranscoderRegularizerConfig

    def __init__(self, spec, model, groups) -> None:
        Regularizer.__init__(self, spec, model, groups)
        p: TranscoderRegularizerConfig = self.params
        by_name = {hp.name: hp for hp in self.hookpoints}
        self.block = transcoder_block(sorted(by_name, key=lambda n: n.endswith("mlp.out")), spec.where)
        x_name, y_name = transcoder_sites(self.block)
        self.site, self.target = by_name[x_name], by_name[y_name]
        self.metric_prefix = metric_prefix(self.block)
        self.sae_cfg = p
        self._dp_group = groups.dp_group if groups.dp_size > 1 else None
        self.sae = ParallelTranscoder(self.site.global_dim, p, groups.tp_group, groups.tp_size, groups.tp_rank,
                                      seed=p.seed, skip=p.skip, normalize_decoder=p.normalize_decoder,
                                      device=groups.device, dp_group=self._dp_group, b_dec_rate=p.b_dec_rate)
        self.tracker = FiringTracker(self.sae.num_local_latents, p.dead_window_tokens, dp_group=self._dp_group,
                                     device=groups.device)
        # b_dec is refitted in every training forward (b_dec_rate), not stepped by Adam
        trained = [q for q in self.sae.parameters() if q.requires_grad]
        self.optimizer = torch.optim.Adam(trained, lr=p.lr, betas=tuple(p.betas), eps=p.adam_eps)
        self._calls = 0
        self._steps = 0
        self._pending = 0
        self._b_pre_ready = False  # init_biases sets the scales even with b_pre_init zeros
        self._redundancy = self._compute_redundancy() if p.redundancy_every else None
        if p.mode == "detached" and spec.coefficient != 0 and groups.is_writer:
            logger.warning("%s (%s): mode detached: the model receives no gradient from the transcoder; "
                           "coefficient %g only scales its loss's share of train/total_loss", spec.where, spec.name,
                           spec.coefficient)

    @classmethod
    def check_params(cls, params: TranscoderRegularizerConfig, model_cfg: ModelConfig, hookpoints: list[str],
                     where: str, tp_size: int) -> None:
        block = transcoder_block(hookpoints, where)
        SAECoTraining.check_params(params, model_cfg, [transcoder_sites(block)[0]], where, tp_size)
        rate = params.b_dec_rate
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and 0 < rate <= 1):
            raise ConfigError(f"{where}.b_dec_rate: {rate!r} must be a number in (0, 1] (1 = refit b_dec exactly "
                              "every micro-step)")

    def loss(self, acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = acts[self.site.name], acts[self.target.name]
        joint = self.params.mode == "joint"
        # Fresh leaves: y depends on x through the MLP, so dL/dx must be the partial derivative
        # (the trainer's backward carries <y, g_y> on through the MLP to x); a gradient w.r.t.
        # the captured x itself would also run, and free, the MLP's part of the model's graph.
        x_in = x.detach().requires_grad_(joint and x.requires_grad)
        y_in = y.detach().requires_grad_(joint and y.requires_grad)
        pairs = [(a, leaf) for a, leaf in ((x, x_in), (y, y_in)) if leaf.requires_grad]
        inputs = [leaf for _, leaf in pairs]
        self._calls += 1
        if not self._b_pre_ready:
            self.sae.init_biases(x.detach(), y.detach(), dp_group=self._dp_group)  # collective over DP, once
            self._b_pre_ready = True
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self.sae(x_in, target=y.detach())  # refits b_dec first (b_dec_rate)
            dead = self.tracker.dead_mask() if self.tracker.may_have_dead() else None
            total, parts = self.sae.training_loss(y_in, out, dead, normalize=self.params.recon_normalize)
            params = [q for q in self.sae.parameters() if q.requires_grad]
            grads = torch.autograd.grad(total, params + inputs, allow_unused=True)
        self._accumulate(params, grads)
        value = total.detach()
        for (a, _), g in zip(pairs, grads[len(params):]):
            if g is not None:
                dot = (a.float() * g.float()).sum()
                value = value + (dot - dot.detach())
        with torch.no_grad():
            self.tracker.update(out.latents)
            # The SAE metrics compare out.x_in with out.x_hat: here the target y with y_hat.
            metrics = self._metrics(dataclasses.replace(out, x_in=y.detach().to(out.x_hat.dtype)), parts)
        return value, metrics

    def eval_metrics(self, model, batches) -> dict[str, float]:
        """`transcoder/blocks.<i>.mlp/*` on the validation batches (transcoder_splice_metrics):
        ce_loss_recovered (y_hat replacing the MLP's output), fvu, l0, dead / dense fractions, ..."""
        return transcoder_splice_metrics(model, self.sae, self.block, batches, self.groups)
