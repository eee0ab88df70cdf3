"""Summarise the weight-sparse vs dense experiment (docs/experiments/weight_sparse.md).

    python experiments/weight_sparse_table.py ROOT [--kinds sparse,sparseact,sparse256,dense,dense64] [--task verb_number]

ROOT holds one run directory per model and seed, `ws_<kind>_s<seed>` (tti train
configs/weight_sparse.yaml, see the page for the overrides), and, where measured, the
circuit results `circ_<task>_<kind>_s<seed>.json` (tti circuit ... --out). Prints Markdown tables:
per kind, the final eval loss (mean +- standard error over seeds), how much it still fell
over the last quarter of training (convergence), the final weight density, and the nodes
each circuit search kept (trained model, model at initialisation, random labels) with
whether it reached the target loss; then, where the circuit files count edges, the trained
circuit's edges (nonzero block weights between kept nodes) beside the model's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import pyarrow.parquet as pq

from tti_dist.models.layout import model_layout
from tti_dist.rundir import RunDir


def mean_se(values: list[float], digits: int = 3, sep: str = "") -> str:
    """'mean +- standard error' over seeds ('x (1 seed)' for one); sep="," groups thousands."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{sep}.{digits}f} (1 seed)"
    se = statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.mean(values):{sep}.{digits}f} +- {se:{sep}.{digits}f}"


def block_weights(run: Path, density: float) -> tuple[int, int]:
    """(hidden size, nonzero weights of the blocks' four matrices) of a run."""
    cfg = RunDir(run).load_config()
    layout = model_layout(cfg.model)
    total = sum(lin.in_features * lin.out_features for lin in layout.linears
                if lin.role in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    return cfg.model.hidden_size, round(total * density)


def run_summary(run: Path) -> dict:
    table = pq.read_table(run / "metrics.parquet").to_pydict()
    evals = [(s, v) for s, v in zip(table["step"], table["eval/loss"]) if v is not None]
    last_step, last = evals[-1]
    earlier = [v for s, v in evals if s <= 0.75 * last_step]
    density = [v for k, col in table.items() if k.startswith("weights/blocks") for v in col[-1:]]
    return {"loss": last, "fall_last_quarter": (earlier[-1] - last) / earlier[-1] if earlier else math.nan,
            "density": statistics.mean(density) if density else 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--kinds", default="sparse,sparseact,sparse256,dense,dense64")
    parser.add_argument("--task", default="verb_number")
    args = parser.parse_args()
    print("| model | d | nonzero block weights | seeds | eval loss | fall over last 25% | density | circuit: trained "
          "| at init | random labels |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    edge_rows = []
    for kind in args.kinds.split(","):
        runs = sorted(args.root.glob(f"ws_{kind}_s*"))
        runs = [r for r in runs if r.is_dir() and (r / "metrics.parquet").exists()]
        if not runs:
            continue
        rows = [run_summary(r) for r in runs]
        circuits: dict[str, list[str]] = {"trained": [], "init": [], "random_labels": []}
        kept: dict[str, list[float]] = {"trained": [], "init": [], "random_labels": []}
        totals: list[int] = []
        edges: list[tuple[int, int, bool]] = []  # (edges kept, edges in the model, reached) per seed
        for r in runs:
            path = args.root / f"circ_{args.task}_{kind}_{r.name.rsplit('_', 1)[1]}.json"
            if path.exists():
                result = json.loads(path.read_text())
                for entry in circuits:
                    e = result[entry]
                    circuits[entry].append(f"{e['nodes_kept']['all']}{'' if e['reached'] else '*'}")
                    totals.append(result["nodes_total"]["all"])
                    if e["reached"]:
                        kept[entry].append(e["nodes_kept"]["all"])
                if "edges_total" in result:
                    t = result["trained"]
                    edges.append((t["edges_kept"]["all"], result["edges_total"]["all"], t["reached"]))
        cells = []
        for entry in circuits:
            if not circuits[entry]:
                cells.append("-")
                continue
            reached = kept[entry]
            summary = mean_se([float(v) for v in reached], 0) if reached else "none reached"
            if reached and totals:
                summary += f" ({statistics.mean(reached) / totals[0]:.0%} of {totals[0]})"
            cells.append(f"{summary} [{', '.join(circuits[entry])}]")
        width, nonzero = block_weights(runs[0], rows[0]["density"])
        print(f"| {kind} | {width} | {nonzero:,} | {len(rows)} | {mean_se([r['loss'] for r in rows])} | "
              f"{statistics.mean(r['fall_last_quarter'] for r in rows):.1%} | "
              f"{statistics.mean(r['density'] for r in rows):.3f} | " + " | ".join(cells) + " |")
        if edges:
            reached = [(k, t) for k, t, ok in edges if ok]
            summary = mean_se([float(k) for k, _ in reached], 0, sep=",") if reached else "none reached"
            share = mean_se([k / t for k, t in reached], 3) if reached else "-"
            seeds = ", ".join(f"{k:,}{'' if ok else '*'}" for k, _, ok in edges)
            edge_rows.append(f"| {kind} | {edges[0][1]:,} | {summary} [{seeds}] | {share} |")
    if edge_rows:
        print("\n| model | edges in the model (nonzero block weights) | edges of the trained circuit | "
              "share of the model's edges |")
        print("|---|---|---|---|")
        print("\n".join(edge_rows))
    print("\nCircuit cells: mean +- SE of the nodes kept over the seeds whose search reached the target, "
          "then each seed's count; * = the target loss was not reached (the count is the smallest mask tried).")


if __name__ == "__main__":
    main()
