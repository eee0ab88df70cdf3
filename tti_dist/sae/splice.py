"""Splice metrics: how much of the LM's behaviour an SAE's reconstruction keeps (docs/metrics.md#splice-metrics).

For a site s (a replicated hookpoint) and token batches, three forward passes of the frozen
model per batch, in eval mode under no_grad:

    clean    the normal forward;
    spliced  a forward hook on s's HookPoint returns the SAE's reconstruction of its output
             (x_hat, replicated over TP), so everything downstream sees x_hat instead of x;
    zero     the hook returns zeros (zero ablation).

Per target token t (next-token prediction, the real vocabulary V = model.cfg.vocab_size: the
padded rows of the vocab-parallel logits, indices >= V, are excluded from the softmax):

    CE_m    = -log p_m(y_t)                                   m in {clean, spliced, zero}
    KL_m    = sum_v p_clean(v) (log p_clean(v) - log p_m(v))  KL(clean || m), m in {spliced, zero}

averaged over all target tokens of the eval set on all DP ranks, then

    ce_loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)
    delta_lm_loss     = CE_spliced - CE_clean
    kl_score          = (KL_zero - KL_spliced) / KL_zero

(tti_dist.sae.metrics). The log-softmax is computed from the local logit shard with two TP
all-reduces per forward (MAX of the per-token max, SUM of the per-token sum of exp), the target's
log-probability with one more (SUM; only the owning rank contributes), and the KL's per-token
sum with one (SUM). The SAE's own metrics use the SAE forward of the spliced pass: EV and
shrinkage (ExplainedVarianceAccumulator, in the SAE's input space, i.e. out.x_in vs out.x_hat),
L0, the per-latent firing density over the eval tokens (dead = density 0, dense = density >
0.01 / 0.1) and decoder redundancy. All sums are float64 and reduced once at the end over the
DP group (explicit groups throughout).

`normalize_input`: the SAE then reconstructs the per-token normalized input
x_in = (x - mean_d x) / ||x - mean_d x||. The spliced activation is mapped back to the site's
space with the token's own statistics, x_hat_site = x_hat * ||x - mean_d x|| + mean_d x, so a
perfect reconstruction in the SAE's space splices x exactly. EV etc. stay in the SAE's space.

Transcoders (`transcoder_splice_metrics`, tti_dist/sae/transcoder.py): the same three passes
and definitions, with the MLP's output blocks.<i>.mlp.out replaced by the transcoder's y_hat,
computed from the MLP's input blocks.<i>.resid_mid of the same forward (zero pass: the MLP's
output zero-ablated); EV / FVU compare y_hat with the MLP's own output. Tags
transcoder/blocks.<i>.mlp/<name>.

CE here is over the real vocabulary, so CE_clean can differ slightly from the trainer's
eval/loss, whose softmax (megatron's vocab_parallel_cross_entropy) also includes the padded rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from tti_dist.capture.hookpoints import HookPoint, HookPointInfo, list_hookpoints
from tti_dist.sae.metrics import (
    ExplainedVarianceAccumulator,
    ce_loss_recovered,
    decoder_redundancy,
    delta_lm_loss,
    kl_score,
)
from tti_dist.config.sae import NORM_EPS
from tti_dist.sae.model import ParallelSAE

_F64 = torch.float64

METRIC_NAMES = (
    "ce_clean", "ce_spliced", "ce_zero", "ce_loss_recovered", "delta_lm_loss",
    "kl_spliced", "kl_zero", "kl_score",
    "ev", "fvu", "shrinkage", "l0", "dead_fraction", "dense_fraction_1pct", "dense_fraction_10pct",
    "redundancy", "num_tokens",
)
"""Keys of `splice_metrics`' result, each as sae/<site>/<name>."""


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def vocab_parallel_log_softmax(
    logits_local: torch.Tensor, vocab_size: int, tp_group: dist.ProcessGroup | None, tp_rank: int = 0
) -> torch.Tensor:
    """log softmax over the real vocabulary from this rank's contiguous logit shard.

    logits_local [..., V_pad / tp] holds global vocabulary indices [tp_rank V_local, (tp_rank+1) V_local);
    indices >= vocab_size (padding) are dropped, so the result is [..., valid_local] with
    valid_local = clamp(vocab_size - tp_rank V_local, 0, V_local). Communication over tp_group: an
    all-reduce MAX and an all-reduce SUM of one float32 per token.
    """
    v_local = logits_local.shape[-1]
    valid = max(0, min(v_local, vocab_size - tp_rank * v_local))
    logits = logits_local[..., :valid].float()
    if valid > 0:
        m = logits.amax(dim=-1)
    else:
        m = torch.full(logits.shape[:-1], float("-inf"), device=logits.device)
    if _size(tp_group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - m.unsqueeze(-1)
    sum_exp = shifted.exp().sum(dim=-1)
    if _size(tp_group) > 1:
        dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=tp_group)
    return shifted - sum_exp.log().unsqueeze(-1)


def _target_logprob(logp_local: torch.Tensor, targets: torch.Tensor, tp_group, tp_rank: int, v_local: int) -> torch.Tensor:
    """log p(target) per token; the owning TP rank contributes it, one SUM all-reduce."""
    lo = tp_rank * v_local
    local_t = targets - lo
    owned = (local_t >= 0) & (local_t < logp_local.shape[-1])
    idx = local_t.clamp(0, max(logp_local.shape[-1] - 1, 0))
    if logp_local.shape[-1] > 0:
        picked = logp_local.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        val = torch.where(owned, picked, torch.zeros_like(picked))
    else:
        val = torch.zeros(targets.shape, device=logp_local.device)
    if _size(tp_group) > 1:
        dist.all_reduce(val, op=dist.ReduceOp.SUM, group=tp_group)
    return val


def _kl(logp_clean: torch.Tensor, logp_other: torch.Tensor, tp_group) -> torch.Tensor:
    """KL(clean || other) per token from local log-prob shards; one SUM all-reduce over TP."""
    part = (logp_clean.exp() * (logp_clean - logp_other)).sum(dim=-1)
    if _size(tp_group) > 1:
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=tp_group)
    return part


def _resolve_site(model: nn.Module, site) -> tuple[str, HookPoint]:
    if isinstance(site, HookPointInfo):
        return site.name, site.module
    hps = list_hookpoints(model)
    for hp in hps:
        if (isinstance(site, str) and hp.name == site) or hp.module is site:
            return hp.name, hp.module
    raise ValueError(f"splice_metrics: site {site!r} is not a hookpoint of the model")


def reconstruct_site(sae: ParallelSAE, x: torch.Tensor):
    """(SAEOutput, x_hat mapped back to the site's space and dtype) for a site activation x."""
    out = sae(x)
    x_hat = out.x_hat
    if sae.cfg.normalize_input:
        xf = x.to(x_hat.dtype)
        mean = xf.mean(dim=-1, keepdim=True)
        scale = (xf - mean).norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        x_hat = x_hat * scale + mean
    return out, x_hat.to(x.dtype)


@torch.no_grad()
def splice_metrics(model: nn.Module, sae: ParallelSAE, site, batches, groups) -> dict[str, float]:
    """Splice metrics of `sae` at `site` of `model` over token `batches` (see the module docstring).

    Args:
        model: the (TP-sharded) GPT; forward(tokens) returns the local logit shard. Put in eval
            mode for the measurement, its previous mode restored afterwards.
        sae: a ParallelSAE on the same TP group, input width = the site's width.
        site: the hookpoint: a HookPointInfo, its name, or its HookPoint module. Must be
            replicated over TP.
        batches: this DP rank's int64 token batches [batch, seq + 1] (inputs [:, :-1], targets [:, 1:]).
        groups: tti_dist ParallelGroups (tp_group, tp_rank, tp_size, dp_group, dp_size, device).

    Returns {"sae/<site>/<name>": float} for every name in METRIC_NAMES, identical on all ranks.
    Communication: per forward 3-4 TP all-reduces of one float per token (log-softmax, target,
    KL) plus the SAE's own (docs/sae.md); at the end one DP all-reduce of 5 + n/tp float64
    (loss sums, L0 count, densities), the EV accumulator's d + 5 float64 (DP), a TP all-reduce
    of the dead / dense counts and the decoder-redundancy all-gather (TP).
    """
    name, module = _resolve_site(model, site)
    if module.tp_sharded:
        raise ValueError(f"splice_metrics: site {name} is TP-sharded; splicing needs a replicated site")
    return _splice(model, sae, module, None, batches, groups, f"sae/{name}/")


@torch.no_grad()
def transcoder_splice_metrics(model: nn.Module, transcoder: ParallelSAE, block: int, batches,
                              groups) -> dict[str, float]:
    """Replacement metrics of a transcoder (tti_dist.sae.transcoder) of block `block`'s MLP: in
    the spliced pass the MLP's output blocks.<i>.mlp.out is replaced by y_hat = transcoder(x)
    of the same forward's MLP input x = blocks.<i>.resid_mid; the zero pass zero-ablates the
    MLP's output. CE_m, KL_m, ce_loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean),
    delta_lm_loss and kl_score exactly as in `splice_metrics`; ev / fvu and shrinkage compare
    y_hat with the MLP's own output y of that forward (FVU = 1 - EV of y); l0, dead and dense
    fractions and redundancy as for an SAE. Returns {"transcoder/blocks.<i>.mlp/<name>": float}
    for every name in METRIC_NAMES, identical on all ranks; communication as splice_metrics."""
    _, source = _resolve_site(model, f"blocks.{block}.resid_mid")
    _, target = _resolve_site(model, f"blocks.{block}.mlp.out")
    return _splice(model, transcoder, target, source, batches, groups, f"transcoder/blocks.{block}.mlp/")


def _splice(model: nn.Module, sae: ParallelSAE, module: HookPoint, source: HookPoint | None, batches, groups,
            prefix: str) -> dict[str, float]:
    """The three passes and the metrics. source None: the SAE reconstructs `module`'s own
    output; else `module`'s output is replaced by sae(source's output of the same forward)."""
    tp_group = groups.tp_group if groups.tp_size > 1 else None
    dp_group = groups.dp_group if groups.dp_size > 1 else None
    vocab_size = model.cfg.vocab_size
    device = groups.device
    was_training = model.training
    sae_training = sae.training
    model.eval()
    sae.eval()

    state: dict = {"mode": "clean"}
    ev_acc = ExplainedVarianceAccumulator()
    fire_counts = torch.zeros(sae.num_local_latents, dtype=_F64, device=device)
    # [ce_clean, ce_spliced, ce_zero, kl_spliced, kl_zero, nonzero latents, tokens]
    sums = torch.zeros(7, dtype=_F64, device=device)

    def source_hook(_mod, _inp, output):
        state["x"] = output

    def hook(_mod, _inp, output):
        mode = state["mode"]
        if mode == "clean":
            return None
        if mode == "zero":
            return torch.zeros_like(output)
        if source is None:
            out, x_hat = reconstruct_site(sae, output)
            ev_acc.update(out.x_in, out.x_hat)
        else:  # a transcoder: y_hat from this forward's input replaces the output y
            out = sae(state.pop("x"))
            x_hat = out.x_hat.to(output.dtype)
            ev_acc.update(output.to(out.x_hat.dtype), out.x_hat)
        f = out.latents.reshape(-1, sae.num_local_latents)
        fire_counts.add_((f != 0).sum(dim=0).to(_F64))
        sums[5] += torch.count_nonzero(f).to(_F64)
        sums[6] += f.shape[0]
        return x_hat

    handles = [module.register_forward_hook(hook)]
    if source is not None:
        handles.append(source.register_forward_hook(source_hook))
    num_targets = 0
    try:
        for batch in batches:
            batch = batch.to(device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            logps = {}
            for mode in ("clean", "spliced", "zero"):
                state["mode"] = mode
                logits = model(inputs)
                logps[mode] = vocab_parallel_log_softmax(logits, vocab_size, tp_group, groups.tp_rank)
                v_local = logits.shape[-1]
            for i, mode in enumerate(("clean", "spliced", "zero")):
                lp = _target_logprob(logps[mode], targets, tp_group, groups.tp_rank, v_local)
                sums[i] -= lp.to(_F64).sum()
            sums[3] += _kl(logps["clean"], logps["spliced"], tp_group).to(_F64).sum()
            sums[4] += _kl(logps["clean"], logps["zero"], tp_group).to(_F64).sum()
            num_targets += targets.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        sae.train(sae_training)

    l0_count = sums[5:6].clone()
    if tp_group is not None:  # nonzero latents: each TP rank counted its own
        dist.all_reduce(l0_count, op=dist.ReduceOp.SUM, group=tp_group)
    packed = torch.cat([sums[:5], l0_count, sums[6:7], torch.tensor([float(num_targets)], dtype=_F64, device=device),
                        fire_counts])
    if dp_group is not None:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=dp_group)
    n_tok, n_targets = packed[6], packed[7]
    ce_clean, ce_spliced, ce_zero, kl_sp, kl_zero = (packed[:5] / n_targets).tolist()
    density = packed[8:] / n_tok
    counts = torch.stack([(density == 0).sum(), (density > 0.01).sum(), (density > 0.1).sum()]).to(_F64)
    if tp_group is not None:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=tp_group)
    n = float(sae.cfg.num_latents)
    ev = float(ev_acc.compute(dp_group))
    metrics = {
        "ce_clean": ce_clean,
        "ce_spliced": ce_spliced,
        "ce_zero": ce_zero,
        "ce_loss_recovered": ce_loss_recovered(ce_clean, ce_spliced, ce_zero) if ce_zero != ce_clean else float("nan"),
        "delta_lm_loss": delta_lm_loss(ce_clean, ce_spliced),
        "kl_spliced": kl_sp,
        "kl_zero": kl_zero,
        "kl_score": kl_score(kl_sp, kl_zero) if kl_zero != 0 else float("nan"),
        "ev": ev,
        "fvu": 1.0 - ev,
        "shrinkage": float(ev_acc.shrinkage(dp_group)),
        "l0": float(packed[5] / n_tok),
        "dead_fraction": float(counts[0] / n),
        "dense_fraction_1pct": float(counts[1] / n),
        "dense_fraction_10pct": float(counts[2] / n),
        "redundancy": float(decoder_redundancy(sae.W_dec, tp_group)),
        "num_tokens": float(n_targets),
    }
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()}


COMPOUND_METRIC_NAMES = ("ce_clean", "ce_spliced", "delta_lm_loss", "kl_spliced", "sum_l0", "num_tokens")
"""Keys of `compound_splice_metrics`' result, each as sae/compound/<name>."""


@torch.no_grad()
def compound_splice_metrics(model: nn.Module, saes: dict[str, ParallelSAE], batches, groups) -> dict[str, float]:
    """All SAEs spliced in at once: the next-token loss when every site's output is replaced by
    its SAE's reconstruction in the same forward (Lai et al. 2025's "compound CE loss
    increase"; each SAE then encodes a stream already changed by the SAEs upstream of it).

        delta_lm_loss = CE_spliced_all - CE_clean,   kl_spliced = KL(clean || spliced_all),
        sum_l0        = sum over sites of the mean active latents per token in that forward,

    over all target tokens of `batches` on all DP ranks (definitions and TP handling as in
    `splice_metrics`: real vocabulary only, float64 sums, one DP all-reduce at the end, and a
    TP all-reduce of the per-site nonzero counts). Zero ablation of every site at once would
    remove the whole stream, so no ce_loss_recovered is defined here.

    Args:
        model: the (TP-sharded) GPT, as for splice_metrics.
        saes: site name -> ParallelSAE on that site (replicated sites only).
        batches, groups: as for splice_metrics.
    Returns {"sae/compound/<name>": float} for every name in COMPOUND_METRIC_NAMES.
    """
    sites = {name: _resolve_site(model, name)[1] for name in saes}
    for name, module in sites.items():
        if module.tp_sharded:
            raise ValueError(f"compound_splice_metrics: site {name} is TP-sharded; splicing needs a replicated site")
    tp_group = groups.tp_group if groups.tp_size > 1 else None
    dp_group = groups.dp_group if groups.dp_size > 1 else None
    device = groups.device
    was_training = model.training
    model.eval()
    state = {"spliced": False}
    # [ce_clean, ce_spliced, kl_spliced, tokens, targets] then one nonzero count per site
    sums = torch.zeros(5, dtype=_F64, device=device)
    nonzero = torch.zeros(len(saes), dtype=_F64, device=device)

    def make_hook(i: int, sae: ParallelSAE):
        def hook(_mod, _inp, output):
            if not state["spliced"]:
                return None
            out, x_hat = reconstruct_site(sae, output)
            nonzero[i] += torch.count_nonzero(out.latents).to(_F64)
            return x_hat
        return hook

    handles = [sites[name].register_forward_hook(make_hook(i, sae)) for i, (name, sae) in enumerate(saes.items())]
    sae_modes = {name: sae.training for name, sae in saes.items()}
    for sae in saes.values():
        sae.eval()
    try:
        for batch in batches:
            batch = batch.to(device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            state["spliced"] = False
            logits = model(inputs)
            lp_clean = vocab_parallel_log_softmax(logits, model.cfg.vocab_size, tp_group, groups.tp_rank)
            state["spliced"] = True
            logits = model(inputs)
            lp_spliced = vocab_parallel_log_softmax(logits, model.cfg.vocab_size, tp_group, groups.tp_rank)
            v_local = logits.shape[-1]
            sums[0] -= _target_logprob(lp_clean, targets, tp_group, groups.tp_rank, v_local).to(_F64).sum()
            sums[1] -= _target_logprob(lp_spliced, targets, tp_group, groups.tp_rank, v_local).to(_F64).sum()
            sums[2] += _kl(lp_clean, lp_spliced, tp_group).to(_F64).sum()
            sums[3] += inputs.numel()
            sums[4] += targets.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        for name, sae in saes.items():
            sae.train(sae_modes[name])
    if tp_group is not None:  # each TP rank counted its own latents
        dist.all_reduce(nonzero, op=dist.ReduceOp.SUM, group=tp_group)
    packed = torch.cat([sums, nonzero])
    if dp_group is not None:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=dp_group)
    n_tok, n_targets = packed[3], packed[4]
    ce_clean, ce_spliced, kl_sp = (packed[:3] / n_targets).tolist()
    metrics = {
        "ce_clean": ce_clean,
        "ce_spliced": ce_spliced,
        "delta_lm_loss": delta_lm_loss(ce_clean, ce_spliced),
        "kl_spliced": kl_sp,
        "sum_l0": float((packed[5:] / n_tok).sum()),
        "num_tokens": float(n_targets),
    }
    return {f"sae/compound/{k}": float(v) for k, v in metrics.items()}
