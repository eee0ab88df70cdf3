"""Step-time cost of each interpretability regularizer / constraint: regularized / plain.

Measures the trainer's optimizer step (one micro-batch, TP=1, DP=1, one process with a
real size-1 process group and megatron-core parallel_state) for several variants of the
same model, built exactly as `tti train` builds them (our GPT on megatron-core layers, our
DeepSpeed engine builder, the regularizers parsed from config entries and built around
the engine's module, one ActivationCapture over the union of their hookpoints):

    logits = engine(tokens[:, :-1]); loss = lm_loss(logits, tokens[:, 1:]).mean()
    for reg in regularizers: loss = loss + reg(captured_activations, step)[0]
    engine.backward(loss); capture.clear(); engine.step()

Variants (`--variants`, default all):
    plain          no regularizer (the reference)
    l1             L1 on every block's mlp.act
    orth_sampled   orthogonality of every block's mlp.fc1 rows, mode sampled_global, k = --k
    orth_full      the same, mode full (exact full Gram)
    decorrelation  DeCov on every block's resid_post, normalize, max_tokens = --decorr-tokens
    topk           model.mlp_topk = --topk (architectural: distributed top-k mask of mlp.act)
    bottleneck     model.bottleneck_layer = L // 2, bottleneck_dim = --latents (architecture only)
    bottleneck_tc  bottleneck + kl + total_correlation (mss, max_tokens = --tc-tokens)
    sae_detached   a TopK SAE (--sae-expansion x d latents, k = --sae-k) on blocks.{L-1}.resid_post,
                   trained on the detached activation with its own Adam (type: sae)
    sae_joint      the same SAE, joint co-training (the model gets the SAE's gradient)

Every variant is built once (same seed, same weights where shapes agree), then the timed
steps go round-robin over the variants (step 1 of each, step 2 of each, ...), so slow
drifts of the machine (other processes, clocks) hit all variants alike. The ratio is
median(variant step) / median(plain step). The 1-minute load average before and after is
printed: on a shared CPU, ratios taken under load are noise.

Examples:
    python bench/regularizer_overhead.py --preset smoke --steps 20           # CPU
    python bench/regularizer_overhead.py --preset gpt2-124m --steps 30       # one H100 (bf16)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from throughput import PRESETS, config_overrides, device_description, resolve_shape  # noqa: E402

VARIANTS = ("plain", "l1", "orth_sampled", "orth_full", "decorrelation", "topk", "bottleneck", "bottleneck_tc",
            "sae_detached", "sae_joint")
DEFAULT_VARIANTS = VARIANTS[:8]  # the SAE variants are bench/sae_overhead.py's


def parse_args(argv: list[str] | None = None, default_variants: tuple[str, ...] | None = None,
               bench_name: str = "regularizer_overhead") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Step-time ratio (regularized / plain) of each tti_dist regularizer and "
        "architectural constraint, one process (TP=1), variants timed round-robin.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke", help="model/batch shape (default: %(default)s)")
    for flag, help_text in (("--layers", "transformer blocks"), ("--hidden", "residual width d"),
                            ("--heads", "attention heads"), ("--vocab", "vocabulary size"),
                            ("--seq", "tokens per sequence"), ("--batch", "sequences per step")):
        parser.add_argument(flag, type=int, help=help_text)
    parser.add_argument("--variants", default=",".join(default_variants or DEFAULT_VARIANTS),
                        help="comma-separated subset of: " + ", ".join(VARIANTS) + " (plain is always added)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default: %(default)s)")
    parser.add_argument("--k", type=int, default=256, help="orth_sampled: directions per matrix (capped at the width)")
    parser.add_argument("--topk", type=int, default=32, help="topk: units kept per token (default: %(default)s)")
    parser.add_argument("--latents", type=int, default=32, help="bottleneck: latent dimension (default: %(default)s)")
    parser.add_argument("--tc-tokens", type=int, default=256, help="bottleneck_tc: TC samples per step")
    parser.add_argument("--decorr-tokens", type=int, default=1024, help="decorrelation: tokens per step")
    parser.add_argument("--sae-expansion", type=int, default=16, help="sae_*: latents = expansion x d (default: %(default)s)")
    parser.add_argument("--sae-k", type=int, default=32, help="sae_*: active latents per token (default: %(default)s)")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=1, help="ZeRO stage (default: %(default)s)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="train.precision (default: auto = bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--timeout-s", type=int, default=600, help="process-group timeout in seconds")
    args = parser.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: {', '.join(unknown)} unknown; choose from {', '.join(VARIANTS)}")
    args.variants = ["plain"] + [v for v in chosen if v != "plain"]
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    args.compile = False  # config_overrides reads it
    args.bench_name = bench_name
    return args


def variant_settings(name: str, args: argparse.Namespace, layers: int, ffn: int,
                     hidden: int) -> tuple[list[str], list[dict]]:
    """(model --set overrides, regularizer entries) of a variant."""
    if name == "plain":
        return [], []
    if name == "l1":
        return [], [{"type": "l1", "name": "l1", "coefficient": 1e-3, "hookpoints": ["blocks.*.mlp.act"]}]
    if name in ("orth_sampled", "orth_full"):
        entry = {"type": "orthogonality", "name": "orth", "coefficient": 1e-2, "weights": ["blocks.*.mlp.fc1"]}
        entry.update({"mode": "sampled_global", "k": min(args.k, ffn)} if name == "orth_sampled" else {"mode": "full"})
        return [], [entry]
    if name == "decorrelation":
        return [], [{"type": "decorrelation", "name": "decorr", "coefficient": 1e-2,
                     "hookpoints": ["blocks.*.resid_post"], "normalize": True, "max_tokens": args.decorr_tokens}]
    if name == "topk":
        return [f"model.mlp_topk={min(args.topk, ffn)}"], []
    if name in ("sae_detached", "sae_joint"):
        return [], [{"type": "sae", "name": "sae", "coefficient": 1.0 if name == "sae_joint" else 0.0,
                     "hookpoints": [f"blocks.{layers - 1}.resid_post"], "mode": name.removeprefix("sae_"),
                     "num_latents": args.sae_expansion * hidden, "k": args.sae_k}]
    bottleneck = [f"model.bottleneck_layer={layers // 2}", f"model.bottleneck_dim={args.latents}"]
    if name == "bottleneck":
        return bottleneck, []
    site = f"blocks.{layers // 2}.bottleneck.z"
    return bottleneck, [
        {"type": "kl", "name": "kl", "coefficient": 1e-3, "hookpoints": [site]},
        {"type": "total_correlation", "name": "tc", "coefficient": 1e-2, "hookpoints": [site],
         "estimator": "mss", "max_tokens": args.tc_tokens},
    ]


def main(argv: list[str] | None = None, default_variants: tuple[str, ...] | None = None,
         bench_name: str = "regularizer_overhead") -> int:
    args = parse_args(argv, default_variants, bench_name)
    shape = resolve_shape(args)

    from tti_dist.capture.hookpoints import ActivationCapture
    from tti_dist.config import load_config
    from tti_dist.config.regularizers import parse_regularizers
    from tti_dist.distributed.groups import init_parallel, resolve_device, shutdown_parallel, single_process_env
    from tti_dist.errors import ConfigError
    from tti_dist.regularizers import build_regularizers, validate_run_config
    from tti_dist.regularizers.base import CoTrainedModule
    from tti_dist.runtime.session import quiet_dependency_warnings
    from tti_dist.utils.logging import setup_logging

    base = config_overrides(shape, args)
    configs = {}
    try:
        for name in args.variants:
            base_cfg = load_config(None, base)
            model_sets, entries = variant_settings(name, args, shape.layers, base_cfg.model.ffn_size,
                                                   shape.hidden)
            cfg = load_config(None, base + model_sets)
            cfg = dataclasses.replace(cfg, regularizers=parse_regularizers(entries))
            validate_run_config(cfg, world_size=1)
            configs[name] = cfg
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    setup_logging("WARNING")
    first = next(iter(configs.values()))
    device = resolve_device(first.train.device)
    quiet_dependency_warnings(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    else:
        torch.set_num_threads(os.cpu_count() or 1)
    env = single_process_env()
    env.__enter__()
    groups = init_parallel(1, device, first.train.dist_timeout_s)
    try:
        from tti_dist.models.gpt import GPT, lm_loss
        from tti_dist.train.engine import build_engine, resolve_bf16
        from tti_dist.utils.seeding import seed_runtime, seed_weights

        gen = torch.Generator().manual_seed(args.seed)
        tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), generator=gen).to(device)

        def sync() -> None:
            if on_cuda:
                torch.cuda.synchronize(device)

        runners = {}
        for name, cfg in configs.items():
            seed_weights(cfg.train.seed)
            model = GPT(cfg.model, groups)
            seed_runtime(cfg.train.seed, groups.dp_rank)
            engine, _ = build_engine(model, cfg, groups)
            regs = build_regularizers(cfg.regularizers, engine.module, groups)
            hookpoints = {hp.name: hp for reg in regs for hp in reg.captures}
            capture = ActivationCapture(list(hookpoints.values())).__enter__() if hookpoints else None
            engine.train()
            runners[name] = (engine, regs, capture)

        def step(name: str, index: int) -> float:
            engine, regs, capture = runners[name]
            t0 = time.perf_counter()
            loss = lm_loss(engine(tokens[:, :-1]), tokens[:, 1:]).mean()
            acts = capture.captured if capture is not None else {}
            for reg in regs:
                weighted, _ = reg(acts, index)
                loss = loss + weighted
            engine.backward(loss)
            if capture is not None:
                capture.clear()
            engine.step()
            for reg in regs:
                if isinstance(reg, CoTrainedModule):
                    reg.after_optimizer_step()  # the SAE's own optimizer step, as the trainer does
            sync()
            return time.perf_counter() - t0

        for i in range(args.warmup):
            for name in runners:
                step(name, i)
        load_before = round(os.getloadavg()[0], 2)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for i in range(args.steps):
            for name in runners:
                times[name].append(step(name, args.warmup + i))
        load_after = round(os.getloadavg()[0], 2)

        plain = statistics.median(times["plain"])
        results = {}
        print(f"{'variant':<15} {'median ms':>10} {'mean ms':>10} {'ratio':>8} {'overhead':>9}")
        for name, ts in times.items():
            med = statistics.median(ts)
            ratio = med / plain
            results[name] = {"median_s": round(med, 6), "mean_s": round(statistics.fmean(ts), 6),
                             "ratio": round(ratio, 4)}
            print(f"{name:<15} {1000 * med:>10.2f} {1000 * statistics.fmean(ts):>10.2f} {ratio:>8.3f} "
                  f"{100 * (ratio - 1):>+8.1f}%")
        summary = {
            "bench": args.bench_name, "date": date.today().isoformat(),
            "device": device_description(device), "torch": torch.__version__, "preset": args.preset,
            "layers": shape.layers, "hidden": shape.hidden, "heads": shape.heads, "vocab": shape.vocab,
            "seq": shape.seq, "batch": shape.batch, "zero": first.zero.stage,
            "precision": "bf16" if resolve_bf16(first, device) else "fp32",
            "k": args.k, "topk": args.topk, "latents": args.latents, "tc_tokens": args.tc_tokens,
            "decorr_tokens": args.decorr_tokens,
            "sae_expansion": args.sae_expansion, "sae_k": args.sae_k, "warmup_steps": args.warmup, "timed_steps": args.steps,
            "variants": results, "loadavg_1m": [load_before, load_after],
            "command": f"python bench/{args.bench_name}.py " + " ".join(sys.argv[1:] if argv is None else argv),
        }
        print(f"load avg (1 min): before {load_before}, after {load_after}")
        print(json.dumps(summary, separators=(",", ":")))
        for _, _, capture in runners.values():
            if capture is not None:
                capture.__exit__(None, None, None)
    finally:
        shutdown_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
