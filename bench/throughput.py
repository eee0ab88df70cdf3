"""Training throughput of tti_dist: tokens/s, step time, model TFLOP/s and MFU.

Measures what `tti train` runs, in one process (TP=1, DP=1): a real size-1 process group
and megatron-core parallel_state (`init_parallel`), our `GPT` on megatron-core
tensor-parallel layers, wrapped by our `build_engine` (DeepSpeed ZeRO, the generated
DeepSpeed config: AdamW, gradient clipping, bf16 when asked), and the trainer's step:

    logits = engine(tokens[:, :-1])
    loss = lm_loss(logits, tokens[:, 1:]).mean()   # megatron vocab-parallel cross entropy
    engine.backward(loss); engine.step()

on random int64 tokens [batch, seq + 1]. No data loader, eval, metrics or checkpoints:
the figure is the model + engine step alone. `--guard` adds the Trainer's per-step fault
checks before the update (the gradient norm at ZeRO stage 0, the all-reduce of the
non-finite and stop flags and its host sync; docs/reliability.md).

Side by side (default; `--no-baseline` skips it): the same GPT shape in plain PyTorch
(bench/plain_gpt.py: nn.Linear blocks, SDPA, F.cross_entropy, torch.optim.AdamW with the
same settings, clip_grad_norm_, the same precision and compile flag), built in the same
process and timed round-robin with tti's step (one tti step, one plain step, ...), so a
drift of a shared machine hits both alike. `ratio` = plain median step / tti median step =
tti tokens/s over plain tokens/s: 1.0 means the framework costs nothing per step.

FLOPs per trained token (PaLM, Chowdhery et al. 2022, appendix B; the convention of
nanoGPT's estimate_mfu):

    flops_per_token = 6 * N + 12 * L * T * d

- N: all model parameters except the learned position table. The vocabulary matrix is
  counted once: with tied embeddings it is the input lookup and the output matmul at
  once, and the 6N term is meant for the matmul. Without tying, the input embedding table
  (a lookup, no matmul) is excluded and the output projection counted. The padded
  vocabulary (vocab_pad_multiple) is counted, since the output matmul computes it.
  6N: forward 2N FLOPs (one multiply-add per parameter per token), backward 4N
  (gradients with respect to activations and to weights).
- 12 * L * T * d: attention scores (Q K^T) and values (P V), forward and backward, for L
  layers, context T, width d; causal masking is not discounted (PaLM convention).

MFU = achieved model FLOP/s / peak FLOP/s. The peak comes from --peak-tflops; on CUDA it
defaults to 989 TFLOP/s (H100 SXM, dense bf16); on CPU MFU is "n/a" unless given.

Timing: `--warmup` untimed steps (these include torch.compile and DeepSpeed's first-step
work), then `--steps` timed steps, each read with time.perf_counter (after
torch.cuda.synchronize on CUDA). Reports median and mean step time; tokens/s uses the
mean (all timed tokens / all timed time, as `perf/tokens_per_sec` in `tti train`), a
median-based value is printed too. `--breakdown` also times forward+loss, backward and
optimizer step (with a device sync between them). The 1-minute load average before and
after the timed steps is reported: CPU figures taken while other processes compete for
the cores are not throughput figures. With `--compile` (train.compile), the number of Dynamo graph breaks
is reported (0 on our GPT at ZeRO 0-2; ZeRO-3 with compile is refused by config validation).

Examples:
    python bench/throughput.py --preset smoke --steps 20                  # CPU, seconds
    python bench/throughput.py --preset gpt2-124m --compile --steps 50    # one H100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

# Runnable as `python bench/throughput.py` from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PRESETS: dict[str, dict[str, int]] = {
    # GPT-2 small shape (nanoGPT's padded vocabulary 50304 = 393 * 128, so padding adds none).
    "gpt2-124m": {"layers": 12, "hidden": 768, "heads": 12, "vocab": 50304, "seq": 1024, "batch": 16},
    # The model of configs/smoke.yaml: byte vocabulary (257, padded to 384).
    "smoke": {"layers": 4, "hidden": 128, "heads": 4, "vocab": 257, "seq": 128, "batch": 8},
}
H100_SXM_BF16_DENSE_TFLOPS = 989.0


@dataclass(frozen=True)
class Shape:
    """The benchmarked model and batch shape."""

    layers: int
    hidden: int
    heads: int
    vocab: int
    seq: int
    batch: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training throughput (tokens/s, step time, TFLOP/s, MFU) of tti_dist's GPT "
        "through its DeepSpeed engine builder, one process (TP=1).",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpt2-124m",
                        help="model/batch shape (default: %(default)s); the shape flags below replace single preset values")
    parser.add_argument("--layers", type=int, help="transformer blocks (model.num_layers)")
    parser.add_argument("--hidden", type=int, help="residual width d (model.hidden_size)")
    parser.add_argument("--heads", type=int, help="attention heads (model.num_heads)")
    parser.add_argument("--vocab", type=int, help="vocabulary size (model.vocab_size; >= 257)")
    parser.add_argument("--seq", type=int, help="tokens per sequence T (data.seq_len = model.max_seq_len)")
    parser.add_argument("--batch", type=int, help="sequences per step (train.micro_batch_size)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before timing (default: %(default)s)")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=1, help="DeepSpeed ZeRO stage (default: %(default)s)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="train.precision (default: %(default)s = bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--compile", action="store_true", help="train.compile: compile the model inside the engine (DeepSpeed engine.compile), as tti train does")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="default: %(default)s = cuda when available, else cpu")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak FLOP/s for MFU, in TFLOP/s (default: 989 on CUDA = H100 SXM dense "
                        "bf16; none on CPU, where MFU prints n/a)")
    parser.add_argument("--seed", type=int, default=1234, help="weight and token seed (default: %(default)s)")
    parser.add_argument("--timeout-s", type=int, default=600, help="process-group timeout in seconds (default: %(default)s)")
    parser.add_argument("--per-step", action="store_true", help="also print every timed step's time")
    parser.add_argument("--guard", action="store_true",
                        help="include the Trainer's per-step fault checks in tti's step: the gradient norm at ZeRO "
                             "stage 0 and the all-reduce of the non-finite/stop flags with its host sync")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the plain-PyTorch baseline (bench/plain_gpt.py) timed side by side")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time forward+loss, engine.backward and engine.step separately "
                        "(adds a device sync between them on CUDA)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps: {args.steps} must be >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup: {args.warmup} must be >= 0")
    return args


def resolve_shape(args: argparse.Namespace) -> Shape:
    values = dict(PRESETS[args.preset])
    for key in values:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return Shape(**values)


def config_overrides(shape: Shape, args: argparse.Namespace) -> list[str]:
    """`--set`-style overrides: the run `tti train` would do with this shape, TP=1, no I/O."""
    total_steps = args.warmup + args.steps
    return [
        f"model.num_layers={shape.layers}",
        f"model.hidden_size={shape.hidden}",
        f"model.num_heads={shape.heads}",
        f"model.vocab_size={shape.vocab}",
        f"model.max_seq_len={shape.seq}",
        "model.position_embedding=learned",
        "model.tie_embeddings=true",
        "parallel.tp_size=1",
        "parallel.dp_size=1",
        f"zero.stage={args.zero}",
        f"train.steps={total_steps}",
        f"train.micro_batch_size={shape.batch}",
        "train.grad_accum_steps=1",
        f"train.seed={args.seed}",
        f"train.device={args.device}",
        f"train.precision={args.precision}",
        f"train.compile={'true' if args.compile else 'false'}",
        "train.eval_every=0",
        f"train.dist_timeout_s={args.timeout_s}",
        f"optim.warmup_steps={min(10, total_steps - 1)}",  # validation: < train.steps
        f"data.seq_len={shape.seq}",
        "logging.tensorboard=false",
        "logging.parquet=false",
        "logging.progress_bar=false",
        "checkpoint.every=0",
        "checkpoint.save_final=false",
    ]


def flops_params(model: torch.nn.Module) -> int:
    """N of the 6N term: all parameters except the position table; vocabulary matrix once.

    Counted on the built model (TP=1, so local == global); `parameters()` yields a shared
    (tied) tensor once. Without tying, the input embedding (a lookup) is left out and the
    output projection (a matmul) kept.
    """
    n = sum(p.numel() for p in model.parameters())
    if model.position_embedding is not None:
        n -= model.position_embedding.weight.numel()
    if not model.cfg.tie_embeddings:
        n -= model.embedding.weight.numel()
    return n


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = resolve_shape(args)

    from tti_dist.config import load_config, validate_config
    from tti_dist.distributed.groups import init_parallel, resolve_device, shutdown_parallel
    from tti_dist.errors import ConfigError
    from tti_dist.runtime.session import quiet_dependency_warnings
    from tti_dist.utils.logging import setup_logging

    try:
        cfg = load_config(None, config_overrides(shape, args))
        validate_config(cfg, world_size=1)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    setup_logging("WARNING")
    device = resolve_device(cfg.train.device)
    quiet_dependency_warnings(device)
    if device.type == "cuda":
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # as run_worker does
    else:
        torch.set_num_threads(os.cpu_count() or 1)

    from tti_dist.distributed.groups import single_process_env

    env = single_process_env()
    env.__enter__()  # for the rest of this process: the benchmark is the whole job
    groups = init_parallel(1, device, cfg.train.dist_timeout_s, cfg.parallel.ep_size if cfg.model.moe_num_experts else None)
    try:
        from tti_dist.models.gpt import GPT, lm_loss
        from tti_dist.train.engine import build_engine, resolve_bf16
        from tti_dist.utils.seeding import seed_runtime, seed_weights

        t_setup = time.perf_counter()
        seed_weights(cfg.train.seed)
        model = GPT(cfg.model, groups)
        n_total = sum(p.numel() for p in model.parameters())
        n_flops = flops_params(model)
        flops_per_token = 6 * n_flops + 12 * shape.layers * shape.seq * shape.hidden
        seed_runtime(cfg.train.seed, groups.dp_rank)  # as the Trainer does
        engine, ds_config = build_engine(model, cfg, groups)  # train.compile: engine.compile()
        opt_params = ds_config["optimizer"]["params"]
        optimizer_name = "torch.optim.AdamW" + (" (fused)" if opt_params.get("fused") else "")
        if not opt_params["torch_adam"]:
            optimizer_name = "DeepSpeed FusedAdam"
        setup_s = time.perf_counter() - t_setup

        gen = torch.Generator().manual_seed(cfg.train.seed)
        tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), generator=gen, dtype=torch.int64)
        tokens = tokens.to(device)
        on_cuda = device.type == "cuda"

        def sync() -> None:
            if on_cuda:
                torch.cuda.synchronize(device)

        phase_times: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}

        def train_step(breakdown: bool = False) -> torch.Tensor:
            t0 = time.perf_counter()
            logits = engine(tokens[:, :-1])
            loss = lm_loss(logits, tokens[:, 1:]).mean()
            if breakdown:
                sync()
                t1 = time.perf_counter()
            engine.backward(loss)
            if breakdown:
                sync()
                t2 = time.perf_counter()
            if args.guard:  # what the Trainer adds before every update (docs/reliability.md)
                norm = grad_norm_now(engine, groups) if norm_before_step else None
                step_verdict(loss.detach(), norm, device)
            engine.step()
            if breakdown:
                sync()
                t3 = time.perf_counter()
                for name, dt in (("forward", t1 - t0), ("backward", t2 - t1), ("step", t3 - t2)):
                    phase_times[name].append(dt)
            return loss.detach()

        from tti_dist.train.engine import grad_norm_now
        from tti_dist.train.trainer import step_verdict

        norm_before_step = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
        plain_step = None
        if args.baseline:
            import plain_gpt

            plain_model, plain_opt, plain_sched = plain_gpt.build(
                shape, device, lr=cfg.optim.lr, total_steps=cfg.train.steps, warmup_steps=cfg.optim.warmup_steps,
                compile_model=args.compile, seed=cfg.train.seed)
            plain_step = plain_gpt.make_step(plain_model, plain_opt, plain_sched, bf16=resolve_bf16(cfg, device),
                                             device=device, grad_clip=cfg.optim.grad_clip)

        engine.train()
        t_warm = time.perf_counter()
        for _ in range(args.warmup):
            loss = train_step()
            if plain_step is not None:
                plain_step(tokens)
        sync()
        warmup_s = time.perf_counter() - t_warm
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)

        load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        step_times: list[float] = []
        plain_times: list[float] = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss = train_step(args.breakdown)
            sync()
            step_times.append(time.perf_counter() - t0)
            if plain_step is not None:  # round-robin: one plain step after each tti step
                t0 = time.perf_counter()
                plain_loss = plain_step(tokens)
                sync()
                plain_times.append(time.perf_counter() - t0)
        final_loss = float(loss.item())
        graph_breaks = None
        if args.compile:
            from torch._dynamo.utils import counters

            graph_breaks = sum(counters["graph_break"].values())
        load_after = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        if args.per_step:
            print("step times (ms): " + " ".join(f"{1000 * t:.1f}" for t in step_times))

        tokens_per_step = shape.batch * shape.seq
        median_s = statistics.median(step_times)
        mean_s = statistics.fmean(step_times)
        tokens_per_s = tokens_per_step / mean_s
        tokens_per_s_median = tokens_per_step / median_s
        tflops = flops_per_token * tokens_per_s / 1e12
        peak = args.peak_tflops
        if peak is None and on_cuda:
            peak = H100_SXM_BF16_DENSE_TFLOPS
        mfu = tflops / peak if peak else None
        bf16 = resolve_bf16(cfg, device)
        plain = None
        if plain_times:
            plain_median = statistics.median(plain_times)
            plain = {
                "step_time_median_s": round(plain_median, 6),
                "step_time_mean_s": round(statistics.fmean(plain_times), 6),
                "tokens_per_s_median": round(tokens_per_step / plain_median, 1),
                "final_loss": round(float(plain_loss.item()), 4),
                "ratio": round(plain_median / median_s, 4),  # tti tokens/s over plain tokens/s
            }
        summary = {
            "bench": "throughput",
            "date": date.today().isoformat(),
            "device": device_description(device),
            "torch": torch.__version__,
            "preset": args.preset,
            "layers": shape.layers, "hidden": shape.hidden, "heads": shape.heads,
            "vocab": shape.vocab, "padded_vocab": cfg.model.padded_vocab_size,
            "seq": shape.seq, "batch": shape.batch,
            "params_total": n_total, "params_flops_N": n_flops,
            "precision": "bf16" if bf16 else "fp32",
            "zero": cfg.zero.stage, "compile": bool(args.compile), "guard": bool(args.guard), "graph_breaks": graph_breaks,
            "optimizer": optimizer_name,
            "threads": torch.get_num_threads() if not on_cuda else None,
            "warmup_steps": args.warmup, "timed_steps": args.steps,
            "step_time_median_s": round(median_s, 6), "step_time_mean_s": round(mean_s, 6),
            "step_time_min_s": round(min(step_times), 6), "step_time_max_s": round(max(step_times), 6),
            "tokens_per_s": round(tokens_per_s, 1), "tokens_per_s_median": round(tokens_per_s_median, 1),
            "flops_per_token": flops_per_token, "model_tflops": round(tflops, 4),
            "peak_tflops": peak, "mfu": round(mfu, 4) if mfu is not None else None,
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if on_cuda else None,
            "phase_median_s": {k: round(statistics.median(v), 6) for k, v in phase_times.items()}
            if args.breakdown else None,
            "plain": plain,
            "loadavg_1m": [load_before, load_after],
            "setup_s": round(setup_s, 2), "warmup_s": round(warmup_s, 2), "final_loss": round(final_loss, 4),
            "command": "python bench/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        }
        print_table(summary)
        print(json.dumps(summary, separators=(",", ":")))
    finally:
        shutdown_parallel()
    return 0


def print_table(s: dict) -> None:
    mfu = f"{100 * s['mfu']:.1f}% of {s['peak_tflops']:g} TFLOP/s" if s["mfu"] is not None else "n/a"
    rows = [
        ("device", s["device"]),
        ("torch", s["torch"]),
        ("model", f"{s['preset']}: L={s['layers']} d={s['hidden']} heads={s['heads']} "
                  f"vocab={s['vocab']} (padded {s['padded_vocab']})"),
        ("params", f"{s['params_total']:,} total; N={s['params_flops_N']:,} in 6N"),
        ("batch x seq", f"{s['batch']} x {s['seq']} = {s['batch'] * s['seq']:,} tokens/step"),
        ("precision / zero / compile", f"{s['precision']} / ZeRO-{s['zero']} / {s['compile']}"
         + (f" ({s['graph_breaks']} graph breaks)" if s["compile"] else "")),
        ("steps", f"{s['warmup_steps']} warmup (untimed, {s['warmup_s']} s) + {s['timed_steps']} timed"),
        ("step time median", f"{1000 * s['step_time_median_s']:.1f} ms"),
        ("step time mean", f"{1000 * s['step_time_mean_s']:.1f} ms "
                           f"(min {1000 * s['step_time_min_s']:.1f}, max {1000 * s['step_time_max_s']:.1f})"),
        ("tokens/s", f"{s['tokens_per_s']:,.0f} (median-based {s['tokens_per_s_median']:,.0f})"),
        ("model TFLOP/s", f"{s['model_tflops']:.4g} ({s['flops_per_token'] / 1e6:.2f} MFLOP/token)"),
        ("MFU", mfu),
        ("final loss", f"{s['final_loss']}"),
    ]
    if s["plain"] is not None:
        p = s["plain"]
        rows.append(("plain PyTorch (same shape)", f"median {1000 * p['step_time_median_s']:.1f} ms, "
                     f"{p['tokens_per_s_median']:,.0f} tokens/s (median-based)"))
        rows.append(("tti / plain", f"{p['ratio']:.3f}x tokens/s (plain median step / tti median step)"))
    if s["phase_median_s"] is not None:
        rows.append(("median by phase", ", ".join(
            f"{k} {1000 * v:.1f} ms" for k, v in s["phase_median_s"].items())))
    if s["loadavg_1m"][0] is not None:
        rows.append(("load avg (1 min)", "before {:.2f}, after {:.2f} (above ~cores: other processes compete)".format(
            *s["loadavg_1m"])))
    if s["peak_mem_gib"] is not None:
        rows.append(("peak memory", f"{s['peak_mem_gib']} GiB"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
