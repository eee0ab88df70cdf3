"""SAE co-training (`type: sae`): a tensor-parallel sparse autoencoder trained alongside the LM.

Config entry (one SAE per entry, exactly one replicated hookpoint):

    {type: sae, name: sae_l1, coefficient: 1.0, hookpoints: ["blocks.1.resid_post"],
     mode: joint, num_latents: 4096, activation: topk, k: 32, lr: 1e-3}

See docs/sae.md, "Co-training (`type: sae`)", for the design and its reasons.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.distributed as dist

from tti_dist.capture.hookpoints import summarize_names
from tti_dist.config.regularizers import SAERegularizerConfig
from tti_dist.config.sae import BATCH_SELECTIONS, K_ACTIVATIONS
from tti_dist.config.schema import ModelConfig
from tti_dist.errors import ConfigError
from tti_dist.models.layout import hookpoint_width, is_tp_sharded, model_layout
from tti_dist.regularizers.base import CoTrainedModule, Regularizer, register
from tti_dist.sae.firing_tracker import FiringTracker
from tti_dist.sae.metrics import decoder_redundancy, explained_variance, shrinkage
from tti_dist.sae.model import ParallelSAE
from tti_dist.sae.optimizer_step import sae_optimizer_step
from tti_dist.sae.splice import splice_metrics

logger = logging.getLogger(__name__)

def _replicated_hint(model_cfg: ModelConfig) -> str:
    """The float hookpoints an SAE can read (replicated across TP), compactly."""
    return summarize_names([h.name for h in model_layout(model_cfg).hookpoints if h.is_float and not h.tp_sharded])


@register
class SAECoTraining(Regularizer, CoTrainedModule):
    """A tensor-parallel SAE (tti_dist.sae.ParallelSAE) on one replicated site, co-trained with the LM.

    Source: Bricken et al. 2023 ("Towards Monosemanticity"), Gao et al. 2024 ("Scaling and
    evaluating sparse autoencoders"); joint training of the model with its SAE loss is the
    "co-training" setting of docs/sae.md (the model can be shaped to be reconstructable).

    Per micro-step on the captured activation a [B, T, d] (replicated over TP):
        x_in, x_hat = SAE(a)                               (SAE in fp32, autocast off)
        L = R(x_in, x_hat)      (reconstruction, recon_normalize: default fvu =
                                 sum_t ||x_in - x_hat||^2 / sum_t ||x_in - mean x_in||^2)
            + aux_coefficient * AuxK      (topk, batchtopk, matryoshka; dead mask from before
                                           this micro-batch)
            + l1_coefficient * L1         (relu)
            + l0_coefficient * L0 penalty (jumprelu)
            + the inner prefixes' reconstruction terms (matryoshka)
    One backward of L through the SAE (torch.autograd.grad) gives the SAE parameters'
    gradient dL/dtheta, which is accumulated into their .grad (whatever the coefficient and
    schedule), and in joint mode also g = dL/da. The returned loss is then
      joint:    L + <a, g> - <a, g>.detach()  (value L, gradient g to the model, none to theta)
      detached: L.detach()                    (no gradient; coefficient x L only enters
                                               train/total_loss, a warning says so)
    so the trainer's weighted loss gives the model coefficient x schedule x dL/da while the
    SAE always trains on its full, unweighted loss, and no SAE work is repeated in the
    trainer's backward. The SAE's parameters are not in the DeepSpeed engine: its own Adam
    steps in `after_optimizer_step` (called by the trainer at each gradient-accumulation
    boundary): mean of the accumulated gradients over the micro-steps, all-reduce (mean)
    over the DP group, remove_parallel_gradient, Adam step, zero_grad, normalize_decoder.

    Reduce groups and communication per micro-step (T local tokens, n latents, d width):
    TP as in docs/sae.md (TopK gather, decoder all-reduce 4 T d bytes payload, encoder
    input-gradient all-reduce 4 d or 4 T d bytes in joint mode, AuxK), plus one TP
    all-reduce of 4 float64 for the metrics; DP: the firing tracker (8 (n/tp + 1) bytes),
    b_pre init once (Weiszfeld sums); per optimizer step one DP all-reduce of the local SAE
    gradients (4 (2 n d / tp + n / tp + d) bytes payload); every redundancy_every steps the
    W_dec all-gather over TP.

    Metrics (detached, reg/<name>/*; the trainer averages them over micro-steps and DP ranks):
    loss (L), recon_loss (the normalized reconstruction part R), aux_k, l1, l0_penalty (jumprelu),
    matryoshka_inner (matryoshka), batchtopk_threshold (batchtopk / matryoshka), l0, explained_variance
    and shrinkage (of this micro-batch, docs/metrics.md#explained-variance), dead_fraction (tracker),
    dense_fraction_1pct / dense_fraction_10pct (tracker densities over the tokens of the
    current optimizer step so far, all DP ranks), decoder_redundancy (last computed value).
    """

    Config = SAERegularizerConfig

    def __init__(self, spec, model, groups) -> None:
        super().__init__(spec, model, groups)
        p: SAERegularizerConfig = self.params
        if len(self.hookpoints) != 1 or self.hookpoints[0].tp_sharded:
            raise ConfigError(f"{spec.where}.hookpoints: type 'sae' needs exactly one replicated site; "
                              f"got {[hp.name for hp in self.hookpoints]}")
        self.site = self.hookpoints[0]
        self.sae_cfg = p  # the entry is the SAE's config (SAERegularizerConfig subclasses SAEConfig)
        self._dp_group = groups.dp_group if groups.dp_size > 1 else None
        self.sae = ParallelSAE(self.site.global_dim, self.sae_cfg, groups.tp_group, groups.tp_size, groups.tp_rank,
                               seed=p.seed, device=groups.device, dp_group=self._dp_group)
        self.tracker = FiringTracker(self.sae.num_local_latents, self.sae_cfg.dead_window_tokens,
                                     dp_group=self._dp_group, device=groups.device)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=p.lr, betas=tuple(p.betas), eps=p.adam_eps)
        self._calls = 0
        self._steps = 0
        self._pending = 0  # micro-steps whose gradients are accumulated but not yet stepped
        self._b_pre_ready = self.sae_cfg.b_pre_init == "zeros"
        self._redundancy = self._compute_redundancy() if p.redundancy_every else None
        if p.mode == "detached" and spec.coefficient != 0 and groups.is_writer:
            logger.warning("%s (%s): mode detached: the model receives no gradient from the SAE; coefficient %g "
                           "only scales the SAE loss's share of train/total_loss", spec.where, spec.name,
                           spec.coefficient)

    # ------------------------------------------------------------------ config checks

    @classmethod
    def check_params(cls, params: SAERegularizerConfig, model_cfg: ModelConfig, hookpoints: list[str], where: str,
                     tp_size: int) -> None:
        if len(hookpoints) != 1:
            raise ConfigError(f"{where}.hookpoints: matches {len(hookpoints)} sites ({', '.join(hookpoints)}); "
                              "type 'sae' takes exactly one site (use one entry per SAE)")
        name = hookpoints[0]
        if is_tp_sharded(name):
            raise ConfigError(f"{where}.hookpoints: {name} is split across tensor-parallel ranks; type 'sae' needs "
                              f"a replicated site ({_replicated_hint(model_cfg)})")
        if params.activation in K_ACTIVATIONS and params.k > params.num_latents:
            raise ConfigError(f"{where}.k: {params.k} is larger than the whole SAE (num_latents "
                              f"{params.num_latents}); must be in 1..num_latents")
        params.validate(hookpoint_width(name, model_cfg), tp_size, where)
        if not (math.isfinite(params.lr) and params.lr > 0):
            raise ConfigError(f"{where}.lr: {params.lr!r} must be a finite number > 0")
        if len(params.betas) != 2 or not all(0 <= b < 1 for b in params.betas):
            raise ConfigError(f"{where}.betas: {list(params.betas)!r} must be two numbers in [0, 1)")
        if not (math.isfinite(params.adam_eps) and params.adam_eps > 0):
            raise ConfigError(f"{where}.adam_eps: {params.adam_eps!r} must be a finite number > 0")
        if params.seed < 0:
            raise ConfigError(f"{where}.seed: {params.seed!r} must be an integer >= 0")
        if params.redundancy_every < 0:
            raise ConfigError(f"{where}.redundancy_every: {params.redundancy_every!r} must be an integer >= 0 "
                              "(0 = never)")

    # ------------------------------------------------------------------ per micro-step

    def _compute_redundancy(self) -> torch.Tensor:
        g = self.groups
        return decoder_redundancy(self.sae.W_dec, g.tp_group if g.tp_size > 1 else None).float()

    def loss(self, acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a = acts[self.site.name]
        joint = self.params.mode == "joint" and a.requires_grad
        self._calls += 1
        if not self._b_pre_ready:
            self.sae.init_b_pre(a.detach(), dp_group=self._dp_group)  # collective over DP, once
            self._b_pre_ready = True
        with torch.autocast(device_type=a.device.type, enabled=False):
            out = self.sae(a if joint else a.detach())
            # Dead mask from before this micro-batch. Until dead_window_tokens tokens were seen
            # no latent can be dead: skip AuxK entirely (its aux top-k costs about as much as
            # the SAE itself), decided on the host without a device sync.
            dead = self.tracker.dead_mask() if self.tracker.may_have_dead() else None
            total, parts = self.sae.training_loss(out.x_in, out, dead, normalize=self.params.recon_normalize)
            params = list(self.sae.parameters())
            grads = torch.autograd.grad(total, params + ([a] if joint else []), allow_unused=True)
        self._accumulate(params, grads)
        if joint:
            dot = (a.float() * grads[-1].float()).sum()
            value = total.detach() + (dot - dot.detach())
        else:
            value = total.detach()
        with torch.no_grad():
            self.tracker.update(out.latents)
            metrics = self._metrics(out, parts)
        return value, metrics

    def _accumulate(self, params: list[torch.Tensor], grads: tuple) -> None:
        """Add this micro-step's gradients (grads[:len(params)], None = unused) into params' .grad
        and count the micro-step; `after_optimizer_step` takes their mean."""
        for p, gp in zip(params, grads[:len(params)]):
            if gp is None:
                continue
            if p.grad is None:
                p.grad = gp.detach().clone()
            else:
                p.grad.add_(gp)
        self._pending += 1

    @torch.no_grad()
    def _metrics(self, out, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self.groups
        f = out.latents.reshape(-1, self.sae.num_local_latents)
        density = self.tracker.density()
        counts = torch.stack([torch.count_nonzero(f).double(), self.tracker.dead_mask().sum().double(),
                              (density > 0.01).sum().double(), (density > 0.1).sum().double()])
        if g.tp_size > 1:  # one all-reduce for l0, dead and dense fractions (4 float64)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=g.tp_group)
        n = float(self.sae_cfg.num_latents)
        metrics = {
            "recon_loss": parts["mse"],
            "l0": counts[0] / f.shape[0],
            "explained_variance": explained_variance(out.x_in, out.x_hat),
            "shrinkage": shrinkage(out.x_in, out.x_hat),
            "dead_fraction": counts[1] / n,
            "dense_fraction_1pct": counts[2] / n,
            "dense_fraction_10pct": counts[3] / n,
        }
        for key in ("aux_k", "l1", "l0_penalty", "matryoshka_inner"):
            if key in parts:
                metrics[key] = parts[key]
            elif key == "aux_k" and self.sae_cfg.activation in K_ACTIVATIONS:
                metrics[key] = torch.zeros((), device=f.device)  # keep the keys the same every call
        if self.sae_cfg.activation in BATCH_SELECTIONS:
            metrics["batchtopk_threshold"] = self.sae.batchtopk_threshold
        if self._redundancy is not None:
            metrics["decoder_redundancy"] = self._redundancy
        return {k: v.detach().float() for k, v in metrics.items()}

    # ------------------------------------------------------------------ per optimizer step

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """The SAE's own step: micro-step mean, DP mean, gradient projection, Adam, unit-norm decoder."""
        if self._pending == 0:
            return
        sae_optimizer_step(self.sae, self.optimizer, self._dp_group, self.groups.dp_size, micro_steps=self._pending)
        self._pending = 0
        self._steps += 1
        self.tracker.reset_density()
        every = self.params.redundancy_every
        if every and self._steps % every == 0:
            self._redundancy = self._compute_redundancy()

    # ------------------------------------------------------------------ checkpoint

    def eval_metrics(self, model, batches) -> dict[str, float]:
        """Splice metrics of the co-trained SAE on the validation batches (tti_dist.sae.splice):
        `sae/<site>/ce_loss_recovered`, `delta_lm_loss`, `kl_score`, `ev`, `l0`, dead/dense
        fractions, shrinkage, redundancy, ... logged by the trainer at every eval step."""
        return splice_metrics(model, self.sae, self.site, batches, self.groups)

    def state_dict(self) -> dict:
        """SAE parameters, Adam state, firing tracker, counters (identical on the DP ranks of a TP rank)."""
        if self._pending:
            logger.warning("sae %s: checkpoint with %d micro-steps of unstepped SAE gradients (not saved)",
                           self.spec.name, self._pending)
        return {
            "sae": {k: v.detach().clone() for k, v in self.sae.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "tracker": self.tracker.state_dict(),
            "calls": self._calls,
            "steps": self._steps,
            "b_pre_ready": self._b_pre_ready,
            "redundancy": None if self._redundancy is None else self._redundancy.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (same SAE shape and TP rank)."""
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        self._calls = int(state["calls"])
        self._steps = int(state["steps"])
        self._b_pre_ready = bool(state["b_pre_ready"])
        self._pending = 0
        for p in self.sae.parameters():
            p.grad = None
        if state.get("redundancy") is not None and self.params.redundancy_every:
            self._redundancy = state["redundancy"].to(self.groups.device)
