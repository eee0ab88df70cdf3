"""The tax's noise floor and the baselines' convergence warnings (tti_dist/report/noise.py),
on hand-made numbers, and end to end on a hand-made sweep directory whose trials have
metrics.parquet histories written by the project's own ParquetSink.

The sweep (`make_noisy_sweep`): sizes xs (one seed), s and m (seeds 1, 2, 3) x {baseline,
l1 = 0.01}; every baseline has l0_frac 0.5, every regularized trial 0.25, so m* = 0.25 and
each seed's tax is exactly its regularized loss minus its baseline loss:

    xs: tax 0.2 (seed 1)                                     -> not measured: one seed
    s : taxes 0.10, 0.12, 0.11: mean 0.11, sd 0.01,
        SE 0.01/sqrt(3) = 0.00577, t(0.975, 2) = 4.303;
        0.11 > 4.303 SE = 0.0248                             -> distinguishable from zero
    m : taxes 0.05, -0.05, 0.03: mean 0.01, sd sqrt(0.0028) = 0.0529,
        SE 0.0305; 0.01 < 4.303 SE = 0.131                   -> indistinguishable from zero

Baselines: s 2.50, 2.52, 2.51 (sd 0.01, 0.4% of the mean: no warning); m 2.0, 2.1, 2.2
(sd 0.1, 4.76% of 2.1: the seed-spread warning). Histories (eval every 100 of 1000 steps):
the loss at step 800 is 1% above the final one for every baseline except m seed 2, whose
eval/loss falls 5% from step 800 to 1000 (the convergence warning); xs has no
metrics.parquet (cannot judge convergence).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from tti_dist.cli import main
from tti_dist.metrics.metrics_table import PARQUET_NAME
from tti_dist.metrics.parquet_sink import ParquetSink
from tti_dist.report import noise
from tti_dist.report.noise import (CONVERGENCE_DROP, DISTINGUISHABLE, INDISTINGUISHABLE, NO_SEED, ONE_SEED, RULE,
                                   SEED_SPREAD, convergence_warnings, seed_spread, standard_error, t_critical,
                                   tail_drop, tax_noise, tax_verdict)
from tti_dist.report.records import METRICS_TABLE, eval_loss_history
from tti_dist.report.sweep_report import write_report

HEADLINE = "interp/blocks.last.mlp.act/l0_frac"


# ---------------------------------------------------------------- noise floor of the tax

def test_standard_error_closed_form():
    # mean 0.2, deviations -0.1, 0.1, 0: sd = sqrt(0.02 / 2) = 0.1, SE = 0.1 / sqrt(3)
    assert standard_error([0.1, 0.3, 0.2]) == pytest.approx(0.1 / math.sqrt(3))
    # two values a, b: sd = |a - b| / sqrt(2), SE = |a - b| / 2
    assert standard_error([1.0, 1.5]) == pytest.approx(0.25)
    got = tax_noise({1: 0.1, 2: 0.3, 3: 0.2})
    assert got["se"] == pytest.approx(0.0577350269)
    # 0.2 is 3.46 SE: beyond 2 SE (0.115), within t(0.975, 2) SE = 4.303 * 0.0577 = 0.248.
    assert got["t_crit"] == pytest.approx(4.302653, abs=1e-6)
    assert got["verdict"] == INDISTINGUISHABLE and got["distinguishable"] is False
    assert math.isnan(standard_error([0.4]))


def test_t_critical_closed_forms():
    """t(0.975, n - 1), checked against closed forms of Student's t quantile:
    1 dof (Cauchy): tan(pi (p - 1/2)); 2 dof: (2p - 1) / sqrt(2 p (1 - p)); p = 0.975."""
    p = 0.975
    assert t_critical(2) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)       # 12.706
    assert t_critical(3) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)  # 4.303
    assert t_critical(2) == pytest.approx(12.7062, abs=1e-4)
    assert t_critical(3) == pytest.approx(4.3027, abs=1e-4)
    assert t_critical(5) == pytest.approx(2.7764, abs=1e-4)
    assert t_critical(10_000) == pytest.approx(1.95996, abs=1e-3)  # -> the normal's 1.96
    assert math.isnan(t_critical(1)) and math.isnan(t_critical(0))


def test_verdict_at_the_t_boundary():
    # Three seeds m - d, m, m + d: sd = d, SE = d / sqrt(3); with d = 0.1 the boundary is
    # |mean| = t(0.975, 2) SE = 4.3027 * 0.057735 = 0.24841.
    below = tax_noise({1: 0.148, 2: 0.248, 3: 0.348})   # mean 0.248 = 4.296 SE
    above = tax_noise({1: 0.149, 2: 0.249, 3: 0.349})   # mean 0.249 = 4.313 SE
    assert below["se"] == pytest.approx(0.1 / math.sqrt(3)) and above["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert below["verdict"] == INDISTINGUISHABLE and below["distinguishable"] is False
    assert above["verdict"] == DISTINGUISHABLE and above["distinguishable"] is True
    assert tax_noise({1: -0.149, 2: -0.249, 3: -0.349})["verdict"] == DISTINGUISHABLE  # |mean|: a negative tax too
    # 2.5 SE at n = 3: beyond the normal approximation's 2 SE, indistinguishable under t.
    se = 0.1 / math.sqrt(3)
    mid = 2.5 * se
    got = tax_noise({1: mid - 0.1, 2: mid, 3: mid + 0.1})
    assert got["se"] == pytest.approx(se) and abs(mid) > 2 * got["se"]
    assert got["verdict"] == INDISTINGUISHABLE
    # Two seeds: the bar is t(0.975, 1) = 12.71 SE.
    assert tax_verdict(1.27, 0.1, 2) == INDISTINGUISHABLE
    assert tax_verdict(1.272, 0.1, 2) == DISTINGUISHABLE
    assert tax_verdict(0.5, 0.1, 2) == INDISTINGUISHABLE  # 5 SE: the old 2 SE rule called it real
    # Five seeds: 2.78 SE.
    assert tax_verdict(0.277, 0.1, 5) == INDISTINGUISHABLE and tax_verdict(0.278, 0.1, 5) == DISTINGUISHABLE
    # No spread at all: any nonzero mean is distinguishable, a zero one is not.
    assert tax_noise({1: 0.0, 2: 0.0})["verdict"] == INDISTINGUISHABLE
    assert tax_noise({1: 0.05, 2: 0.05})["verdict"] == DISTINGUISHABLE


def test_one_seed_is_not_measured():
    got = tax_noise({7: 0.4})
    assert got["verdict"] == ONE_SEED == "not measured: one seed"
    assert math.isnan(got["se"]) and math.isnan(got["t_crit"]) and got["distinguishable"] is None
    assert tax_verdict(0.4, math.nan, 1) == ONE_SEED
    assert tax_noise({})["verdict"] == NO_SEED


def test_seed_spread():
    got = seed_spread({1: 2.0, 2: 2.1, 3: 2.2})
    assert got["sd"] == pytest.approx(0.1) and got["mean"] == pytest.approx(2.1) and got["n"] == 3
    assert got["rel"] == pytest.approx(0.1 / 2.1)
    one = seed_spread({1: 2.0})
    assert one["n"] == 1 and math.isnan(one["sd"]) and math.isnan(one["rel"])


# ---------------------------------------------------------------- convergence

def _history(ref: float, end: float, final: int = 1000, every: int = 100) -> list[tuple[int, float]]:
    """eval/loss every `every` steps: 2 * ref at the first eval, `ref` at step 0.8 final,
    `end` at the final step, linear in between."""
    cut = int(0.8 * final)
    out = []
    for step in range(every, final + 1, every):
        if step <= cut:
            out.append((step, 2 * ref + (ref - 2 * ref) * (step - every) / (cut - every)))
        else:
            out.append((step, ref + (end - ref) * (step - cut) / (final - cut)))
    return out


def test_tail_drop_reads_the_last_20_percent():
    assert tail_drop(_history(3.0, 2.85), 1000) == (pytest.approx(0.05), None)
    assert tail_drop(_history(3.0, 2.97), 1000) == (pytest.approx(0.01), None)
    # The reference is the last eval at or before 80% of the final step: here step 600.
    history = [(300, 4.0), (600, 3.2), (900, 3.1), (1000, 3.04)]
    assert tail_drop(history, 1000) == (pytest.approx(0.05), None)
    # Without a final step the last eval step is the final one: 80% of 900 = 720 -> step 600 again.
    assert tail_drop(history[:3], None) == (pytest.approx(0.1 / 3.2), None)
    # Order does not matter; NaN points are left out.
    assert tail_drop(list(reversed(history)) + [(950, math.nan)], 1000)[0] == pytest.approx(0.05)
    assert tail_drop([(1000, 3.0)], 1000) == (None, "fewer than 2 eval points")
    assert tail_drop([], 1000) == (None, "fewer than 2 eval points")
    assert tail_drop([(100, 3.0), (800, 2.9)], 1000) == (None, "no eval point in the last 20% of steps")
    assert tail_drop([(900, 3.0), (1000, 2.9)], 1000) == (None, "no eval point at or before 80% of the final step")


def test_convergence_warning_fires_at_5_percent_not_at_1():
    assert CONVERGENCE_DROP == 0.02 and noise.CONVERGENCE_WINDOW == 0.2
    steady = {1: 2.97, 2: 2.97}
    lines = convergence_warnings("m", [(1, _history(3.0, 2.97), 1000), (2, _history(3.0, 2.85), 1000)],
                                 {1: 2.97, 2: 2.97})
    assert lines == ["size m: baselines unconverged: eval/loss fell 5.0% over the last 20% of steps "
                     "(seed 2; threshold 2%)"]
    assert convergence_warnings("m", [(1, _history(3.0, 2.97), 1000), (2, _history(3.0, 2.97), 1000)], steady) == []
    # Two seeds above the threshold: both, largest fall first.
    lines = convergence_warnings("s", [(1, _history(3.0, 2.91), 1000), (2, _history(3.0, 2.85), 1000)], steady)
    assert lines == ["size s: baselines unconverged: eval/loss fell 5.0%, 3.0% over the last 20% of steps "
                     "(seeds 2, 1; threshold 2%)"]


def test_cannot_judge_once_per_size():
    lines = convergence_warnings("xs", [(1, [], None), (2, [(1000, 3.0)], 1000)], {1: 3.0, 2: 3.0})
    assert lines == ["size xs: cannot judge convergence: fewer than 2 eval points (seeds 1, 2)"]


def test_seed_spread_warning_fires_at_3_percent_not_at_1():
    assert SEED_SPREAD == 0.02
    converged = [(1, _history(3.0, 2.97), 1000), (2, _history(3.0, 2.97), 1000)]

    def spread(rel):  # two seeds 1 -+ d: mean 1, sd = d sqrt(2)
        d = rel / math.sqrt(2)
        return {1: 1 - d, 2: 1 + d}

    assert seed_spread(spread(0.03))["rel"] == pytest.approx(0.03)
    lines = convergence_warnings("m", converged, spread(0.03))
    assert lines == ["size m: baselines unconverged: seed spread of eval/loss is 3.0% of its mean "
                     "(sd 0.03, mean 1, 2 seeds; threshold 2%)"]
    assert convergence_warnings("m", converged, spread(0.01)) == []
    assert convergence_warnings("m", converged[:1], {1: 1.0}) == []  # one seed: no spread to judge


# ---------------------------------------------------------------- a sweep on disk

PARAMS = {"xs": 1000, "s": 4000, "m": 16000}
BASE = {("xs", 1): 3.0, ("s", 1): 2.50, ("s", 2): 2.52, ("s", 3): 2.51,
        ("m", 1): 2.0, ("m", 2): 2.1, ("m", 3): 2.2}
TAX = {("xs", 1): 0.2, ("s", 1): 0.10, ("s", 2): 0.12, ("s", 3): 0.11,
       ("m", 1): 0.05, ("m", 2): -0.05, ("m", 3): 0.03}


def _write_history(run_dir: Path, final_loss: float, drop: float) -> None:
    """metrics.parquet with train/loss at every 10th step and eval/loss every 100 of 1000
    steps, falling by `drop` (relative to the step-800 loss) over the last 20%."""
    sink = ParquetSink(run_dir, resume_step=None, rows_per_part=16)  # several parts
    ref = final_loss / (1 - drop)
    evals = dict(_history(ref, final_loss))
    for step in range(10, 1001, 10):
        values = {"train/loss": 5.0 - step / 1000}
        if step in evals:
            values["eval/loss"] = evals[step]
        sink.record(step, step * 64, values)
        if step % 100 == 0:  # a flush at each eval, as the trainer's log interval would
            sink.write()


def make_noisy_sweep(root: Path) -> Path:
    (root / "runs").mkdir(parents=True)
    for (size, seed), base in BASE.items():
        for coeff, frac, loss in ((0.0, 0.5, base), (0.01, 0.25, base + TAX[(size, seed)])):
            name = f"{size}-{coeff}-seed{seed}"
            run = root / "runs" / name
            run.mkdir()
            record = {"trial": name, "axes": {"model_size": size, "l1": coeff, "seed": seed}, "model_size": size,
                      "setting": f"l1={coeff}", "seed": seed, "num_params": PARAMS[size], "steps": 1000,
                      "tokens": 64000, "coefficients": {"l1": coeff}, "status": "completed", "error": None,
                      "final": {"eval/loss": loss, "interp/blocks.1.mlp.act/l0_frac": frac}}
            (run / "trial.json").write_text(json.dumps(record))
            if size != "xs":
                _write_history(run, loss, 0.05 if (size, seed, coeff) == ("m", 2, 0.0) else 0.01)
    (root / "sweep.yaml").write_text("name: noisy\n")
    return root


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    root = make_noisy_sweep(tmp_path_factory.mktemp("noisy"))
    return root, write_report(root)


def test_history_reads_only_eval_rows(noisy):
    root, _ = noisy
    assert METRICS_TABLE == PARQUET_NAME
    history = eval_loss_history(root / "runs" / "m-0.0-seed2")
    assert [s for s, _ in history] == list(range(100, 1001, 100))  # not the 100 train/loss rows
    assert history[-1][1] == pytest.approx(2.1) and history[7][1] == pytest.approx(2.1 / 0.95)
    assert eval_loss_history(root / "runs" / "m-0.0-seed2", "eval/nope") == []
    assert eval_loss_history(root / "runs" / "xs-0.0-seed1") == []  # no metrics.parquet


def test_tax_rows_carry_the_noise_floor(noisy):
    _, result = noisy
    (tax,) = result["taxes"]
    assert tax["metric"] == HEADLINE and tax["m_star"] == pytest.approx(0.25)
    rows = {r["size"]: r for r in tax["rows"]}
    xs, s, m = rows["xs"], rows["s"], rows["m"]
    assert xs["seeds"] == 1 and xs["verdict"] == ONE_SEED and math.isnan(xs["se"]) and xs["distinguishable"] is None
    assert xs["baseline_seeds"] == 1 and math.isnan(xs["baseline_sd"])
    assert s["mean"] == pytest.approx(0.11) and s["std"] == pytest.approx(0.01)
    assert s["se"] == pytest.approx(0.01 / math.sqrt(3)) and s["verdict"] == DISTINGUISHABLE
    assert s["t_crit"] == pytest.approx(4.3027, abs=1e-4) and m["t_crit"] == pytest.approx(4.3027, abs=1e-4)
    assert math.isnan(xs["t_crit"])
    assert s["baseline_sd"] == pytest.approx(0.01) and s["baseline_seeds"] == 3
    assert m["mean"] == pytest.approx(0.01) and m["std"] == pytest.approx(math.sqrt(0.0028))
    assert m["se"] == pytest.approx(math.sqrt(0.0028 / 3)) and m["verdict"] == INDISTINGUISHABLE
    assert m["distinguishable"] is False and m["baseline_sd"] == pytest.approx(0.1)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_warnings_logged_and_in_report(tmp_path):
    root = make_noisy_sweep(tmp_path / "sweep")
    # A handler of its own: `tti` (setup_logging) stops tti_dist records from reaching the root
    # logger, where pytest's caplog listens.
    handler = _Collect()
    logger = logging.getLogger("tti_dist.report")
    logger.addHandler(handler)
    try:
        result = write_report(root)
    finally:
        logger.removeHandler(handler)
    expected = [
        "size xs: cannot judge convergence: fewer than 2 eval points (seed 1)",
        "size m: baselines unconverged: eval/loss fell 5.0% over the last 20% of steps (seed 2; threshold 2%)",
        "size m: baselines unconverged: seed spread of eval/loss is 4.8% of its mean "
        "(sd 0.1, mean 2.1, 3 seeds; threshold 2%)",
    ]
    assert result["warnings"] == expected  # size s: converged (1%) and tight (0.4%)
    assert handler.messages == expected
    text = (root / "report.md").read_text()
    section = text.split("## Warnings\n\n")[1].split("\n\n")[0]
    assert section.splitlines() == [f"- {w}" for w in expected]
    assert ("Noise floor: the baselines' eval/loss varies over seeds by sd (ddof=1) xs not measured (1 seed), "
            "s 0.01 (3 seeds), m 0.1 (3 seeds)") in text
    assert ("distinguishable from zero when |mean| > t(0.975, n-1) x SE (Student's t, two-sided 95%), "
            "SE = sd / sqrt(n) over n >= 2 seeds") in text and RULE in text
    assert "| SE | t(0.975, n-1) | verdict |" in text
    assert f"| s | 4000 | {HEADLINE} | <= 0.25 | 0.11 | 0.01 | 3 | {0.01 / math.sqrt(3):.4g} | 4.303 " \
           f"| {DISTINGUISHABLE} | 0.01 | 3 |" in text
    assert f"| m | 16000 | {HEADLINE} | <= 0.25 | 0.01 |" in text
    assert f"| 4.303 | {INDISTINGUISHABLE} | 0.1 | 3 |" in text
    assert f"| xs | 1000 | {HEADLINE} | <= 0.25 | 0.2 | 0 | 1 | nan | nan | {ONE_SEED} | nan | 1 |" in text


def test_converged_sweep_has_no_warnings_section(tmp_path):
    root = make_noisy_sweep(tmp_path / "sweep")
    for path in (root / "runs").glob("xs-*"):
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    for seed, base in ((1, 2.08), (2, 2.1), (3, 2.12)):  # m: spread 0.02/2.1 < 2%, and all converged
        record = json.loads((root / "runs" / f"m-0.0-seed{seed}" / "trial.json").read_text())
        record["final"]["eval/loss"] = base
        (root / "runs" / f"m-0.0-seed{seed}" / "trial.json").write_text(json.dumps(record))
        _write_history(root / "runs" / f"m-0.0-seed{seed}", base, 0.01)
    result = write_report(root)
    assert result["warnings"] == []
    assert "## Warnings" not in (root / "report.md").read_text()


def test_tax_plot_and_printed_table(tmp_path, capsys):
    import matplotlib.image as mpimg

    root = make_noisy_sweep(tmp_path / "sweep")
    assert main(["report", str(root)]) == 0
    image = mpimg.imread(root / "plots" / "tax.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in PARAMS}
    assert lines["xs"].endswith(ONE_SEED)
    assert lines["s"].endswith(DISTINGUISHABLE) and f"{0.01 / math.sqrt(3):.4g}" in lines["s"]
    assert lines["s"].split()[-5] == "4.303"  # ... SE, t crit, base sd, then the 3-word verdict
    assert lines["m"].endswith(INDISTINGUISHABLE)
    assert "a tax is distinguishable from zero when |mean| > t(0.975, n-1) x SE (Student's t, two-sided 95%)" in out
    assert f"3 warning(s), listed under \"Warnings\" in {root / 'report.md'}" in out
