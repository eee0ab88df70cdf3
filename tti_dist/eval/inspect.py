"""The top-activating contexts of one unit or SAE latent, tokens decoded (per rank, for
`tti inspect`: tti_dist/commands/inspect.py checks the options and prints them).

The manual check that a sparse unit means something: the model (loaded as `tti eval` loads
it, at the run's TP degree) reads the first B validation micro-batches; the activation of
unit U of hookpoint SITE (a hidden unit of `blocks.{i}.mlp.act`, a dimension of the residual
stream, ...; TP-sharded sites are gathered, U indexes the whole width) is taken at every
token, or, with `--sae DIR` (the output directory of `tti sae fit` on that site), latent U
of that SAE. The N largest activations are printed with C tokens of left context and the
activating token between « », plus the factor values of the synthetic corpus when the data
has them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tti_dist.capture.hookpoints import ActivationCapture, list_hookpoints
from tti_dist.data.dataset_reader import open_dataset
from tti_dist.distributed.collectives import all_gather_concat
from tti_dist.eval.evaluate import eval_batches
from tti_dist.train.export import load_frozen_model
from tti_dist.config.sae import SAEConfig
from tti_dist.sae.files import read_shard, shard_files
from tti_dist.sae.model import ParallelSAE


@dataclass(frozen=True)
class Context:
    """One top-activating position."""

    value: float
    """The activation."""
    batch: int
    """Micro-batch index within the validation batches read."""
    row: int
    """Sequence within the micro-batch."""
    position: int
    """Token position within the sequence (input positions)."""
    text: str
    """Left context, then «the activating token», then two tokens of right context."""
    factors: dict
    """Ground-truth factor values at the position (synthetic corpus), else empty."""


def load_fitted_sae(sae_dir: str):
    """A TP=1 ParallelSAE holding every latent of a `tti sae fit` output (shards concatenated)."""
    shards = [read_shard(f) for f in shard_files(sae_dir)]
    meta = shards[0][0]
    sae = ParallelSAE(meta["d_model"], SAEConfig(**meta["sae_config"]), None, 1, 0, seed=meta.get("seed", 0))
    states = [state for _, state in shards]
    merged = {
        "W_enc": torch.cat([s["W_enc"] for s in states], dim=0),
        "b_enc": torch.cat([s["b_enc"] for s in states], dim=0),
        "W_dec": torch.cat([s["W_dec"] for s in states], dim=1),
        "b_pre": states[0]["b_pre"],
    }
    sae.load_state_dict(merged, strict=True)
    return sae.eval()


@torch.no_grad()
def top_contexts(plan, settings, groups) -> list[Context]:
    """The top-N contexts of `settings` (site, unit, top, context, sae; from
    tti_dist.commands.inspect.prepare_inspect), computed on every rank (identical)."""
    model = load_frozen_model(plan.cfg, Path(plan.ckpt_dir), plan.tag, groups, plan.weights)
    hp = next(h for h in list_hookpoints(model) if h.name == settings["site"])
    sae = load_fitted_sae(settings["sae"]) if settings["sae"] else None
    batches = eval_batches(plan, plan.cfg.data.path)
    values = []
    with ActivationCapture([hp]) as capture:
        for batch in batches:
            model(batch["tokens"][:, :-1].to(groups.device))
            a = capture.captured[hp.name].float()
            if hp.tp_sharded and groups.tp_size > 1:
                a = all_gather_concat(a, groups.tp_group, dim=-1)
            if sae is not None:
                a = sae(a.cpu()).latents
            values.append(a[..., settings["unit"]].cpu())
            capture.clear()
    acts = torch.stack(values)  # [num_batches, B, T]
    top = torch.topk(acts.reshape(-1), min(settings["top"], acts.numel()))
    tokenizer = open_dataset(plan.cfg.data.path, verify=False).tokenizer
    B, T = acts.shape[1:]
    out = []
    for value, flat in zip(top.values.tolist(), top.indices.tolist()):
        b, rem = divmod(flat, B * T)
        row, pos = divmod(rem, T)
        tokens = batches[b]["tokens"][row]
        left = tokens[max(0, pos - settings["context"]):pos].tolist()
        right = tokens[pos + 1:pos + 3].tolist()
        text = (tokenizer.decode(left) + "«" + tokenizer.decode([int(tokens[pos])]) + "»" + tokenizer.decode(right))
        factors = {k.removeprefix("factor_"): int(v[row, pos]) for k, v in batches[b].items() if k.startswith("factor_")}
        out.append(Context(value=value, batch=b, row=row, position=pos, text=text.replace("\n", "\\n"), factors=factors))
    return out
