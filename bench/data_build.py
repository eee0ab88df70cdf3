"""Peak memory and throughput of `tti data build` at two corpus sizes, 1 and 2 workers.

    python bench/data_build.py [--sizes-mb 20 200] [--workers 1 2] [--vocab-size 8192]
                               [--bpe-sample-bytes 10000000] [--workdir /tmp/tti-bench-data]

Generates a JSONL corpus of real text without the network: the running interpreter's
standard-library `*.py` sources, each file one document (files over 16 KiB split into
pieces of 8-16 KiB, at blank lines where possible), repeated in a different seeded order
each round until the target size. Documents are kept under ~16 KiB because the tokenizers
library's temporary memory is about 100x the largest document it encodes (docs/data.md); a
corpus with one 700 KB document would measure that document, not the corpus size.

Then runs `tti data build` as a subprocess for every size x tokenizer (byte; bpe trained on
a `--bpe-sample-bytes` sample, the same at every size) x workers, and measures:

- peak RSS: the largest *sum* of the VmRSS of the build's process tree (the main process,
  its tokenizing workers and multiprocessing's helper process), sampled from /proc every
  20 ms. This is what the machine must hold at once. Sampling can miss a peak shorter than
  the interval, so the table also gives
- sum of HWM: the sum over the tree's processes of each one's own peak (VmHWM, the kernel's
  per-process high-water mark, last read at most 20 ms before the process exits); an upper
  bound of the concurrent peak, since the processes need not peak at the same time.
- throughput: MB (10^6 bytes) of JSONL input per second of wall time.

Prints a table, the RSS ratios between the largest and smallest corpus, and a one-line JSON
summary (date, machine, command, load average). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SPLIT_ABOVE = 16 * 1024
_PIECE = 8 * 1024


def _documents() -> list[str]:
    """The stdlib's *.py files (third-party packages excluded), large ones split into pieces."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if len(text) <= _SPLIT_ABOVE:
            docs.append(text)
            continue
        piece: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            piece.append(line)
            size += len(line)
            # Cut at a blank line once past 8 KiB, at any line at 16 KiB: a file such as
            # pydoc_data/topics.py (one 700 KB literal) becomes many documents.
            if (size >= _PIECE and not line.strip()) or size >= _SPLIT_ABOVE:
                docs.append("".join(piece))
                piece, size = [], 0
        if piece:
            docs.append("".join(piece))
    return docs


def make_corpus(path: Path, target_bytes: int) -> Path:
    """A JSONL file of at least `target_bytes`, `{"text": ...}` per line (reused if present)."""
    if path.is_file() and path.stat().st_size >= target_bytes:
        return path
    docs = _documents()
    tmp = path.with_suffix(".tmp")
    written = 0
    rng = random.Random(0)
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target_bytes:
            order = list(range(len(docs)))
            rng.shuffle(order)  # each round in another order: no two rounds pack alike
            for i in order:
                line = json.dumps({"text": docs[i]}) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                if written >= target_bytes:
                    break
    os.replace(tmp, path)
    return path


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def _status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in keys:
                    found[name] = int(line.split()[1])
    except OSError:
        pass
    return found


class TreeSampler(threading.Thread):
    """Samples the process tree under `pid`: peak summed VmRSS, each process's VmHWM."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_rss_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self.max_processes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            total = 0
            pids = _tree(self.pid)
            self.max_processes = max(self.max_processes, len(pids))
            for p in pids:
                s = _status_kb(p, ("VmRSS", "VmHWM"))
                total += s.get("VmRSS", 0)
                if "VmHWM" in s:
                    self.hwm_kb[p] = max(self.hwm_kb.get(p, 0), s["VmHWM"])
            self.peak_rss_kb = max(self.peak_rss_kb, total)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run_build(corpus: Path, out: Path, tokenizer: str, workers: int, vocab_size: int,
              sample_bytes: int) -> dict:
    cmd = [sys.executable, "-m", "tti_dist.cli", "data", "build", str(corpus), "--out", str(out), "--overwrite",
           "--tokenizer", tokenizer, "--workers", str(workers)]
    if tokenizer == "bpe":
        cmd += ["--vocab-size", str(vocab_size), "--bpe-sample-bytes", str(sample_bytes)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({proc.returncode}): {' '.join(cmd)}\n{stderr}")
    manifest = json.loads((out / "manifest.json").read_text())
    size = corpus.stat().st_size
    return {
        "input_mb": round(size / 1e6, 1),
        "tokenizer": tokenizer,
        "workers": workers,
        "wall_s": round(wall, 2),
        "mb_per_s": round(size / 1e6 / wall, 2),
        "peak_rss_mb": round(sampler.peak_rss_kb / 1024, 1),
        "sum_hwm_mb": round(sum(sampler.hwm_kb.values()) / 1024, 1),
        "processes": sampler.max_processes,
        "tokens": sum(s["num_tokens"] for s in manifest["splits"].values()),
        "shards": sum(len(s["shards"]) for s in manifest["splits"].values()),
    }


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as f:
            total_gb = int(f.readline().split()[1]) / 1024**2
    except OSError:
        total_gb = float("nan")
    return f"{os.cpu_count()}-core {model}, {total_gb:.0f} GB RAM, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[20, 200], help="corpus sizes (MB of JSONL)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizers", nargs="+", default=["byte", "bpe"])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--bpe-sample-bytes", type=int, default=10_000_000,
                        help="the same sample at every size, so a difference is the corpus's")
    parser.add_argument("--workdir", default="/tmp/tti-bench-data", help="corpora and datasets (kept)")
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    results = []
    for size_mb in args.sizes_mb:
        corpus = make_corpus(work / f"corpus-{size_mb}mb.jsonl", size_mb * 1_000_000)
        for tokenizer in args.tokenizers:
            reference = None
            for workers in args.workers:
                out = work / f"ds-{size_mb}-{tokenizer}-w{workers}"
                r = run_build(corpus, out, tokenizer, workers, args.vocab_size, args.bpe_sample_bytes)
                r["loadavg_1m"] = round(os.getloadavg()[0], 2)
                # The dataset must not depend on the number of workers.
                files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
                r["identical_to_first"] = reference is None or files == reference
                reference = reference or files
                results.append(r)
                print(f"  {size_mb} MB {tokenizer} workers={workers}: {r['wall_s']} s, peak RSS "
                      f"{r['peak_rss_mb']} MB", file=sys.stderr, flush=True)
            for workers in args.workers:
                shutil.rmtree(work / f"ds-{size_mb}-{tokenizer}-w{workers}", ignore_errors=True)

    header = (f"{'input MB':>8} {'tokenizer':>9} {'workers':>7} {'wall s':>7} {'MB/s':>6} {'peak RSS MB':>11} "
              f"{'sum HWM MB':>10} {'procs':>5} {'tokens':>11} {'shards':>6} {'same bytes':>10}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['input_mb']:>8} {r['tokenizer']:>9} {r['workers']:>7} {r['wall_s']:>7} {r['mb_per_s']:>6} "
              f"{r['peak_rss_mb']:>11} {r['sum_hwm_mb']:>10} {r['processes']:>5} {r['tokens']:>11,} "
              f"{r['shards']:>6} {str(r['identical_to_first']):>10}")
    ratios = {}
    lo, hi = min(args.sizes_mb), max(args.sizes_mb)
    if lo != hi:
        print(f"\npeak RSS at {hi} MB / at {lo} MB (target <= 1.3, and < 1 GB):")
        for tokenizer in args.tokenizers:
            for workers in args.workers:
                pick = {round(r["input_mb"]): r for r in results
                        if r["tokenizer"] == tokenizer and r["workers"] == workers}
                a, b = pick.get(lo), pick.get(hi)
                if a and b:
                    ratio = round(b["peak_rss_mb"] / a["peak_rss_mb"], 3)
                    ratios[f"{tokenizer}-w{workers}"] = ratio
                    print(f"  {tokenizer:>5} workers={workers}: {b['peak_rss_mb']} / {a['peak_rss_mb']} MB = {ratio}")
    summary = {
        "bench": "data_build",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "bpe": {"vocab_size": args.vocab_size, "sample_bytes": args.bpe_sample_bytes},
        "rss": "peak of the summed VmRSS of the build's process tree, sampled every 20 ms",
        "results": results,
        "rss_ratio_largest_to_smallest": ratios,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
