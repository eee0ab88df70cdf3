"""`tti inspect`: the top-activating contexts of one unit or SAE latent, tokens decoded.

    tti inspect RUN --site SITE --unit U [--top N] [--checkpoint STEP] [--batches B]
                    [--context C] [--sae DIR]

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

import torch

from tti_dist.errors import ConfigError


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


def prepare_inspect(run_dir, site: str, unit: int, top: int = 20, checkpoint: str | None = None,
                    batches: int = 8, context: int = 12, sae: str | None = None):
    """(EvalPlan, settings) after validating every option (one-line ConfigError)."""
    from tti_dist.capture.hookpoints import summarize_names
    from tti_dist.capture.names import gpt_hookpoint_names, hookpoint_width
    from tti_dist.eval.evaluate import prepare_eval

    plan = prepare_eval(run_dir, checkpoint=checkpoint, batches=batches)
    names = [n for n in gpt_hookpoint_names(plan.cfg.model) if n != "tokens" and not n.endswith("moe.expert")]
    if site not in names:
        raise ConfigError(f"--site: {site!r} is not a hookpoint of this run's model; available: {summarize_names(names)}")
    width = hookpoint_width(site, plan.cfg.model)
    if sae is not None:
        from tti_dist.sae.files import read_meta, shard_files

        files = shard_files(sae)
        if not files:
            raise ConfigError(f"--sae: '{sae}' holds no SAE (sae_tp_rank*.safetensors from tti sae fit)")
        # Every shard is opened here, before any rank starts: a refused file is one line.
        meta = [read_meta(f) for f in files][0]
        if len(files) != meta["tp_size"]:
            raise ConfigError(f"--sae: '{sae}' has {len(files)} of its {meta['tp_size']} TP shards")
        if meta["d_model"] != width:
            raise ConfigError(f"--sae: the SAE in '{sae}' reads a {meta['d_model']}-wide site; {site} is {width} wide")
        width = meta["sae_config"]["num_latents"]
    if not 0 <= unit < width:
        what = "latent" if sae is not None else "unit"
        raise ConfigError(f"--unit: {unit} is not a {what} of {site} (0..{width - 1})")
    if top < 1:
        raise ConfigError(f"--top: {top} must be >= 1")
    if context < 0:
        raise ConfigError(f"--context: {context} must be >= 0")
    return plan, dict(site=site, unit=unit, top=top, context=context, sae=sae)


def launch_inspect(plan, settings) -> list[Context]:
    """Run the inspection on the run's TP degree (in-process for one rank); rank 0's contexts."""
    from tti_dist.train.launcher import launch_ranks

    return launch_ranks(inspect_worker, plan.nproc, plan, settings, name="tti-inspect")[0]


def inspect_worker(plan, settings) -> list[Context]:
    from tti_dist.train.worker import rank_session

    with rank_session(plan.cfg, plan.nproc) as groups:
        return top_contexts(plan, settings, groups)


def _load_sae(sae_dir: str):
    """A TP=1 ParallelSAE holding every latent of a `tti sae fit` output (shards concatenated)."""
    from tti_dist.sae.files import read_shard, shard_files
    from tti_dist.sae.model import ParallelSAE, SAEConfig

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
    """The top-N contexts (computed on every rank; identical)."""
    from tti_dist.capture.hookpoints import ActivationCapture, list_hookpoints
    from tti_dist.data.arrow_dataset import open_dataset
    from tti_dist.eval.evaluate import _gather_last_dim, eval_batches, load_eval_model

    model = load_eval_model(plan, groups)
    hp = next(h for h in list_hookpoints(model) if h.name == settings["site"])
    sae = _load_sae(settings["sae"]) if settings["sae"] else None
    batches = eval_batches(plan, plan.cfg.data.path)
    values = []
    with ActivationCapture([hp]) as capture:
        for batch in batches:
            model(batch["tokens"][:, :-1].to(groups.device))
            a = capture.captured[hp.name].float()
            if hp.tp_sharded and groups.tp_size > 1:
                a = _gather_last_dim(a, groups.tp_group, groups.tp_size)
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


def format_contexts(settings, contexts: list[Context]) -> str:
    """One line per context: rank, activation, the text with «token», factor values."""
    what = f"latent {settings['unit']} of the SAE in {settings['sae']}" if settings["sae"] else f"unit {settings['unit']}"
    lines = [f"top {len(contexts)} activations of {settings['site']} {what}:"]
    for i, c in enumerate(contexts, 1):
        factors = "  " + " ".join(f"{k}={v}" for k, v in c.factors.items() if v >= 0) if c.factors else ""
        lines.append(f"{i:3d}  {c.value:9.4f}  {c.text}{factors}")
    return "\n".join(lines)
