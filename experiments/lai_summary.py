"""Summarise the Lai et al. joint-SAE reproduction (experiments/lai_joint_sae.sh) as a
markdown table beside the published numbers (docs/experiments/lai_joint_sae.md).

    python experiments/lai_summary.py OUT

Per arm (baseline = no SAE loss, regularized = joint SAE training), over seeds: the model's
final validation CE (`eval/loss`), and for the fresh post-hoc TopK SAEs (k per site, all 5
sites) the compound CE increase (all SAEs spliced in at once), the summed L0 in that forward,
the sum of the one-site CE increases and the mean EV. Mean, sample sd (ddof=1) and the
standard error sd/sqrt(n); the difference of the arms with its standard error
sqrt(se_a^2 + se_b^2) (independent seeds).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pyarrow.parquet as pq

SITES = ("blocks.0.resid_pre", "blocks.0.resid_post", "blocks.1.resid_post", "blocks.2.resid_post",
         "blocks.3.resid_post")
PUBLISHED = {  # Lai et al., gpt-circuits experiments/regularization, 10 seeds, 15k steps
    "eval CE": (1.5718, 0.0047, 1.5537, 0.0080),
    "compound ΔCE of fresh SAEs (summed L0 ~90)": (2.689, None, 1.32, None),
}


def final_eval_loss(run: Path) -> float:
    rows = pq.read_table(run / "metrics.parquet", columns=["step", "eval/loss"]).to_pylist()
    return [r["eval/loss"] for r in rows if r["eval/loss"] is not None][-1]


def fit_record(run: Path) -> dict:
    compound = json.loads(next((run / "sae_fit").glob("compound-*.json")).read_text())
    per_site = {}
    for site in SITES:
        path = next((run / "sae_fit").glob(f"{site}-n*-k*/sae_metrics.json"))
        per_site[site] = json.loads(path.read_text())["metrics"]
    return {
        "compound ΔCE": compound["metrics"]["sae/compound/delta_lm_loss"],
        "summed L0": compound["metrics"]["sae/compound/sum_l0"],
        "sum of one-site ΔCE": sum(m[f"sae/{s}/delta_lm_loss"] for s, m in per_site.items()),
        "mean EV": sum(m[f"sae/{s}/ev"] for s, m in per_site.items()) / len(SITES),
        **{f"ΔCE {s}": m[f"sae/{s}/delta_lm_loss"] for s, m in per_site.items()},
    }


def stats(values: list[float]) -> tuple[float, float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, sd, sd / math.sqrt(n)


def main(out: Path) -> None:
    arms = {}
    for arm in ("base", "reg"):
        runs = sorted(out.glob(f"{arm}_s*/"))
        rows = []
        for run in runs:
            row = {"eval CE": final_eval_loss(run)}
            if any((run / "sae_fit").glob("compound-*.json")):
                row.update(fit_record(run))
            rows.append(row)
        arms[arm] = rows
    keys = [k for k in arms["base"][0] if all(k in r for rows in arms.values() for r in rows)]
    print(f"| quantity | baseline (per seed) | baseline mean ± sd | regularized (per seed) | regularized mean ± sd "
          f"| difference ± se |")
    print("|---|---|---|---|---|---|")
    for key in keys:
        cells = []
        for arm in ("base", "reg"):
            vals = [r[key] for r in arms[arm]]
            mean, sd, _ = stats(vals)
            cells += [", ".join(f"{v:.4f}" for v in vals), f"{mean:.4f} ± {sd:.4f}"]
        (mb, _, seb), (mr, _, ser) = stats([r[key] for r in arms["base"]]), stats([r[key] for r in arms["reg"]])
        print(f"| {key} | {' | '.join(cells)} | {mr - mb:+.4f} ± {math.hypot(seb, ser):.4f} |")
    print()
    print("Published (Lai et al.): " + "; ".join(
        f"{k}: baseline {b}{'' if sb is None else f' ± {sb}'}, regularized {r}{'' if sr is None else f' ± {sr}'}"
        for k, (b, sb, r, sr) in PUBLISHED.items()))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
