"""GPT-2 small (configs/gpt2_small.yaml, 124M parameters) end to end on a CPU box.

Runs the real commands as subprocesses, the way a user would:

1. `tti data build` of the config's corpus with its 50,257-token BPE, once (into OUT/data);
2. `tti train configs/gpt2_small.yaml` for `--steps` steps in three layouts:
   tp1 (TP=1, ZeRO-1 (which runs as stage 0 at DP=1), one rank), tp2 (TP=2, ZeRO-1, two
   ranks), zero3 (TP=1 x DP=2, ZeRO-3), and tp1_ac (tp1 with activation checkpointing),
   each with one micro-batch of 1 x 1024 tokens per rank (`--micro-batch`), no compile;
3. `tti eval` and `tti export` of the tp2 run (the TP shards merged back into one model).

While each command runs, every process of its tree is sampled from /proc every 0.2 s
(VmHWM, the kernel's own peak resident set): a rank is recognised by the RANK variable in
its environment, the rest is the launcher. Step time is the run's own perf/step_time_s
(median over the steps after the first, which pays one-time costs).

Next to them it prints DeepSpeed's own estimate of per-rank model-state memory (weights,
gradients, Adam states; no activations) for ZeRO-2 and ZeRO-3 at 124M (this config),
1.3B (24 layers, d=2048) and 7B (32 layers, d=4096), from
`estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`, for one
node of each of `--estimate-ranks` ranks.

    python bench/gpt2_cpu.py --out /tmp/gpt2 --steps 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {
    "tp1": {"parallel.tp_size": 1, "parallel.dp_size": 1, "zero.stage": 1},
    "tp2": {"parallel.tp_size": 2, "parallel.dp_size": 1, "zero.stage": 1},
    "zero3": {"parallel.tp_size": 1, "parallel.dp_size": 2, "zero.stage": 3},
    # tp1 with train.activation_checkpointing: the activation memory it saves, per rank.
    "tp1_ac": {"parallel.tp_size": 1, "parallel.dp_size": 1, "zero.stage": 1, "train.activation_checkpointing": "true"},
}


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(entry))
        except OSError:
            continue
    return out


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class TreeMemory:
    """Peak resident memory (VmHWM) of every process under a root pid, sampled.

    The root is the command (with `--nproc 1` it is the rank itself; otherwise it runs the
    elastic agent); the ranks are its children started by multiprocessing's spawn (their
    environment is set after exec, so /proc does not show RANK: they are numbered in start
    order, which is rank order); other helpers (multiprocessing's resource tracker) are left out.
    """

    def __init__(self, root: int, interval_s: float = 0.2):
        self.root, self.interval_s = root, interval_s
        self.peak_kib: dict[int, int] = {}
        self.cmd: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            todo, seen = [self.root], []
            while todo:
                pid = todo.pop()
                seen.append(pid)
                todo.extend(_children(pid))
            for pid in seen:
                hwm = _status_kib(pid, "VmHWM")
                if hwm is not None:
                    self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), hwm)
                if pid not in self.cmd:
                    self.cmd[pid] = _cmdline(pid)
            self._stop.wait(self.interval_s)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        gib = {pid: round(kib / 2**20, 2) for pid, kib in self.peak_kib.items()}
        ranks = [pid for pid in sorted(gib) if pid != self.root and "spawn_main" in self.cmd.get(pid, "")
                 and "resource_tracker" not in self.cmd.get(pid, "")]
        if not ranks:  # one process: `--nproc 1` runs its rank in the command itself
            return {"rank_peak_rss_gib": {0: gib.get(self.root)}, "launcher_peak_rss_gib": None}
        return {"rank_peak_rss_gib": {r: gib[pid] for r, pid in enumerate(ranks)},
                "launcher_peak_rss_gib": gib.get(self.root)}


def run(cmd: list[str], log: Path) -> dict:
    """Run a command, sampling its process tree's memory; raise with its log tail on failure."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        mem = TreeMemory(proc.pid)
        code = proc.wait()
        stats = mem.stop()
    stats["wall_s"] = round(time.perf_counter() - start, 1)
    if code != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd)} exited {code}; log {log}:\n{tail}")
    return stats


def step_times(run_dir: Path) -> list[float]:
    import pandas as pd

    from tti_dist.metrics import read_metrics

    table = read_metrics(run_dir).to_pandas()
    return [float(v) for v in table["perf/step_time_s"] if not pd.isna(v)]


def deepspeed_estimates(rank_counts: list[int]) -> dict:
    """DeepSpeed's per-rank model-state memory estimates (GiB) at three sizes, for one node of
    each number of ranks (DeepSpeed's formulas assume 16-bit weights and fp32 master copies)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from tti_dist.config.schema import ModelConfig
    from tti_dist.models.gpt import count_parameters

    shapes = {
        "124M": ModelConfig(num_layers=12, hidden_size=768, num_heads=12, vocab_size=50257, max_seq_len=1024),
        "1.3B": ModelConfig(num_layers=24, hidden_size=2048, num_heads=16, vocab_size=50257, max_seq_len=2048),
        "7B": ModelConfig(num_layers=32, hidden_size=4096, num_heads=32, vocab_size=50257, max_seq_len=4096),
    }
    out = {}
    for name, cfg in shapes.items():
        total = count_parameters(cfg)
        largest = cfg.padded_vocab_size * cfg.hidden_size  # the (tied) embedding matrix
        out[name] = {"params": total}
        for gpus in rank_counts:
            # DeepSpeed's functions return (cpu bytes, gpu bytes[, largest layer memory]) per rank.
            z2 = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False)
            z3 = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus, num_nodes=1,
                                                       cpu_offload=False, cpu_offload_params=False)
            out[name][f"{gpus}_ranks"] = {"zero2_gib_per_rank": round(z2[1] / 2**30, 2),
                                          "zero3_gib_per_rank": round(z3[1] / 2**30, 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="working directory (dataset, runs, logs)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences of 1024 tokens per rank per step")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="subset of " + ",".join(LAYOUTS))
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tti eval --max-tokens")
    parser.add_argument("--estimate-ranks", default="2,8", help="ranks per node for DeepSpeed's estimates")
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tti = str(Path(sys.executable).with_name("tti"))
    config = str(ROOT / "configs" / "gpt2_small.yaml")
    load_before = round(os.getloadavg()[0], 2)
    results: dict = {"bench": "gpt2_cpu", "date": date.today().isoformat(),
                     "command": "python bench/gpt2_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)}

    from tti_dist.config import load_config

    cfg = load_config(config, [])
    data = out / "data"
    if not (data / "manifest.json").exists():
        results["data_build"] = run(
            [tti, "data", "build", cfg.data.source, "--out", str(data), "--tokenizer", cfg.data.tokenizer,
             "--vocab-size", str(cfg.model.vocab_size), "--max-bytes", str(cfg.data.max_bytes)],
            out / "data_build.log")
    common = [f"train.steps={args.steps}", f"train.micro_batch_size={args.micro_batch}", "train.grad_accum_steps=1",
              "train.compile=false", f"data.path={data}", "optim.warmup_steps=1", "train.eval_every=0",
              "checkpoint.every=0", "logging.log_every=1", "logging.progress_bar=false"]
    results["train"] = {}
    for name in args.layouts.split(","):
        layout = LAYOUTS[name]
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)  # the bench's own run from an earlier invocation
        sets = common + [f"{k}={v}" for k, v in layout.items()]
        nproc = layout["parallel.tp_size"] * layout["parallel.dp_size"]
        cmd = [tti, "train", config, "--run-dir", str(run_dir), "--nproc", str(nproc)]
        for s in sets:
            cmd += ["--set", s]
        stats = run(cmd, out / f"train_{name}.log")
        times = step_times(run_dir)
        stats["step_time_s"] = [round(t, 2) for t in times]
        stats["step_time_median_after_first_s"] = round(statistics.median(times[1:]), 2) if len(times) > 1 else None
        stats["tokens_per_step"] = args.micro_batch * 1024 * layout["parallel.dp_size"]
        results["train"][name] = stats
        print(name, json.dumps(stats), flush=True)
    if not args.skip_eval and "tp2" in args.layouts.split(","):
        results["eval_tp2"] = run([tti, "eval", str(out / "tp2"), "--max-tokens", str(args.eval_tokens)],
                                  out / "eval_tp2.log")
        results["export_tp2"] = run([tti, "export", str(out / "tp2"), "--out", str(out / "tp2.safetensors")],
                                    out / "export_tp2.log")
        print("eval/export", json.dumps({k: results[k] for k in ("eval_tp2", "export_tp2")}), flush=True)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its tables
        results["deepspeed_estimates"] = deepspeed_estimates([int(n) for n in args.estimate_ranks.split(",")])
    results["loadavg_1m"] = [load_before, round(os.getloadavg()[0], 2)]
    print(json.dumps(results, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
