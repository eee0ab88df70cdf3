"""Summarise the SAE-family experiment (docs/experiments/sae_family.md).

    python experiments/sae_family_table.py ROOT [--site blocks.2.resid_post]

ROOT holds the co-trained runs `sf_<activation>` (tti train configs/sae_family.yaml with the
overrides on the page; `sf_base` is the model trained with the SAE's coefficient 0), each
evaluated by `tti eval` (RUN/eval/<step>.parquet), and the post-hoc fits on the base model
`sf_base/sae_fit/<name>/sae_metrics.json` (tti sae fit; one row per directory). Prints one Markdown row per
SAE: the LM's eval loss, then the SAE's L0, explained variance, CE loss recovered, dead
fraction, ground-truth MCC and mean best-latent F1 (docs/metrics.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq

COLUMNS = ("l0", "ev", "ce_loss_recovered", "dead_fraction", "gt_mcc", "gt_f1_mean")


def co_trained(run: Path, site: str) -> tuple[float, dict[str, float]] | None:
    evals = sorted(run.glob("eval/*.parquet"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
    if not evals:
        return None
    row = pq.read_table(evals[-1]).to_pylist()[0]
    return row["eval/loss"], {c: row.get(f"sae/{site}/{c}") for c in COLUMNS}


def post_hoc(fit_dir: Path, site: str) -> dict[str, float] | None:
    path = fit_dir / "sae_metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())["metrics"]
    return {c: metrics.get(f"sae/{site}/{c}") for c in COLUMNS}


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--site", default="blocks.2.resid_post")
    args = parser.parse_args()
    print("| SAE | trained | LM eval loss | " + " | ".join(COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    for act in ("topk", "batchtopk", "jumprelu", "matryoshka"):
        got = co_trained(args.root / f"sf_{act}", args.site)
        if got:
            loss, m = got
            print(f"| {act} | co-trained (joint 0.5) | {loss:.3f} | " + " | ".join(fmt(m[c]) for c in COLUMNS) + " |")
    base = co_trained(args.root / "sf_base", args.site)
    if base:
        loss, m = base
        print(f"| topk | co-trained (coefficient 0) | {loss:.3f} | " + " | ".join(fmt(m[c]) for c in COLUMNS) + " |")
        for fit_dir in sorted((args.root / "sf_base" / "sae_fit").glob("*")):
            fit = post_hoc(fit_dir, args.site)
            if fit and any(v is not None for v in fit.values()):
                print(f"| {fit_dir.name} | post hoc on the coefficient-0 model | {loss:.3f} | "
                      + " | ".join(fmt(fit[c]) for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
