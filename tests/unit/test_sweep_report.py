"""`tti report DIR` on a hand-made sweep directory whose frontiers and tax are known in closed form.

The fake sweep: sizes xs < s < m (1e3, 4e3, 16e3 parameters) x settings {base (l1 = 0), l1 = 0.01}
x seeds {1, 2}, plus one failed trial. Headline metric interp/blocks.1.mlp.act/l0 (lower is
better, so o = -l0). Per (size, seed), (l0, eval/loss) of base and l1:

    xs seed 1: (40, 3.0) (20, 3.4)      xs seed 2: (40, 3.1) (24, 3.5)
    s  seed 1: (50, 2.5) (30, 2.7)      s  seed 2: (50, 2.6) (25, 2.9)
    m  seed 1: (60, 2.0) (28, 2.4)      m  seed 2: (60, 2.1) (36, 2.3)

Each seed's frontier is its two points. m* = the least of the per-seed best l0s = max(20, 24, 30,
25, 28, 36) = 36 (l0 <= 36). Interpolating loss linearly in l0 at 36, minus the base loss:

    xs: 0.4*4/20 = 0.08, 0.4*4/16 = 0.10            mean 0.09,  std 0.02/sqrt(2)
    s : 0.2*14/20 = 0.14, 0.3*14/25 = 0.168          mean 0.154, std 0.028/sqrt(2)
    m : 0.4*24/32 = 0.30, 0.2 (36 is exactly a point) mean 0.25,  std 0.1/sqrt(2)

With two seeds SE = std / sqrt(2) = |a - b| / 2: xs 0.01, s 0.014, m 0.05, so the means are
9, 11 and 5 SE from zero. Each is beyond 2 SE and within t(0.975, 1) = 12.71 SE: all three
taxes are indistinguishable from zero (tti_dist/report/noise.py).

l0 is a count of units, so that tax compares different things at different widths: the
module fixture asks for it with --metric. The default headline metric is width-independent;
`test_default_headline_is_width_independent` gives the sizes widths (num_units) and checks
the tax on l0_frac = l0 / num_units.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tti_dist.cli import main
from tti_dist.errors import ConfigError
from tti_dist.report.interp_metrics import (headline_metrics, interp_metrics, metric_direction, pareto_metrics,
                                            width_independent)
from tti_dist.report.pareto import frontier_loss_at, interpretability_tax, pareto_frontier
from tti_dist.report.noise import DISTINGUISHABLE, INDISTINGUISHABLE, ONE_SEED, RULE
from tti_dist.report.records import collect_trials, derived_metrics
from tti_dist.report.sweep_report import write_report

L0 = "interp/blocks.1.mlp.act/l0"
L0_BLOCK0 = "interp/blocks.0.mlp.act/l0"
MONO = "interp/blocks.1.mlp.act/mono_share"
PARAMS = {"xs": 1000, "s": 4000, "m": 16000}
# (size, seed) -> ((base l0, base loss), (l1 l0, l1 loss))
POINTS = {
    ("xs", 1): ((40, 3.0), (20, 3.4)), ("xs", 2): ((40, 3.1), (24, 3.5)),
    ("s", 1): ((50, 2.5), (30, 2.7)), ("s", 2): ((50, 2.6), (25, 2.9)),
    ("m", 1): ((60, 2.0), (28, 2.4)), ("m", 2): ((60, 2.1), (36, 2.3)),
}
EXPECTED_TAX = {"xs": [0.08, 0.10], "s": [0.14, 0.168], "m": [0.30, 0.20]}


def _trial(name, size, coeff, seed, l0=None, loss=None, status="completed", units=None):
    final = {}
    if status == "completed":
        final = {"eval/loss": loss, L0: l0, L0_BLOCK0: l0 + 5, MONO: 1.0 / l0,
                 "interp/blocks.1.mlp.act/probe_topic_chance": 0.25}
        if seed == 1:
            final["train/task_loss"] = loss - 0.1
        if units is not None:
            final["interp/blocks.1.mlp.act/num_units"] = units[size]
            final["interp/blocks.1.mlp.fc1/mean_sq_cos_rel"] = 0.9
    return {
        "trial": name,
        "axes": {"model_size": size, "regularizers.0.coeff": coeff, "train.seed": seed},
        "model_size": size,
        "setting": f"regularizers.0.coeff={coeff}",
        "seed": seed,
        "num_params": PARAMS[size],
        "tokens": 2048,
        "coefficients": {"l1": coeff},
        "status": status,
        "error": None if status == "completed" else "RuntimeError: boom",
        "final": final,
    }


def make_sweep(root: Path, sizes=tuple(PARAMS), units=None) -> Path:
    runs = root / "runs"
    runs.mkdir(parents=True)
    n = 0
    for (size, seed), (base, reg) in POINTS.items():
        if size not in sizes:
            continue
        for coeff, (l0, loss) in ((0.0, base), (0.01, reg)):
            name = f"t{n:03d}-{size}-{coeff}-seed{seed}"
            (runs / name).mkdir()
            (runs / name / "trial.json").write_text(json.dumps(_trial(name, size, coeff, seed, l0, loss, units=units)))
            n += 1
    name = f"t{n:03d}-xs-0.1-seed1"
    (runs / name).mkdir()
    (runs / name / "trial.json").write_text(json.dumps(_trial(name, "xs", 0.1, 1, status="failed")))
    (root / "sweep.yaml").write_text("name: handmade\naxes: {}\n")
    return root


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    root = make_sweep(tmp_path_factory.mktemp("sweep"))
    code = main(["report", str(root), "--metric", L0])
    assert code == 0
    return root


def test_summary_parquet(reported):
    table = pq.read_table(reported / "summary.parquet")
    assert table.num_rows == 13
    for col in ("trial", "model_size", "setting", "seed", "num_params", "tokens", "status", "baseline",
                "axis/model_size", "axis/regularizers.0.coeff", "axis/train.seed", "coeff/l1", "eval/loss",
                L0, L0_BLOCK0, MONO, "train/task_loss"):
        assert col in table.column_names, col
    rows = {r["trial"]: r for r in table.to_pylist()}
    r = rows["t003-xs-0.01-seed2"]
    assert (r["model_size"], r["seed"], r["num_params"], r["tokens"]) == ("xs", 2, 1000, 2048)
    assert r["axis/regularizers.0.coeff"] == "0.01" and r["axis/train.seed"] == "2"
    assert r["coeff/l1"] == 0.01 and r["baseline"] is False
    assert r["eval/loss"] == 3.5 and r[L0] == 24.0
    assert r["train/task_loss"] is None  # only seed-1 trials log it
    assert rows["t000-xs-0.0-seed1"]["baseline"] is True
    assert rows["t000-xs-0.0-seed1"]["train/task_loss"] == pytest.approx(2.9)
    failed = rows["t012-xs-0.1-seed1"]
    assert failed["status"] == "failed" and failed["eval/loss"] is None and failed[L0] is None
    assert table.schema.field("axis/train.seed").type == "string"
    assert table.schema.field(L0).type == "double"
    assert sum(table.column("baseline").to_pylist()) == 6


def test_metric_directions_and_headline():
    assert metric_direction(L0) == "lower"
    assert metric_direction("interp/blocks.1.mlp.fc1/mean_abs_cos") == "lower"
    assert metric_direction("interp/blocks.1.resid_post/probe_k1_topic") == "higher"
    assert metric_direction("interp/blocks.1.resid_post/probe_topic") == "higher"
    assert metric_direction("interp/blocks.1.resid_post/probe_topic_chance") is None
    assert metric_direction("interp/blocks.1.mlp.act/log10_density") is None
    assert metric_direction("eval/loss") is None
    assert metric_direction("interp/blocks.1.mlp.act/gaussian_tc_per_unit_bc") == "lower"
    assert metric_direction("interp/blocks.1.mlp.fc1/mean_sq_cos_rel") == "lower"
    assert metric_direction("interp/blocks.1.mlp.act/gaussian_tc") is None  # the uncorrected plug-in: gone
    assert metric_direction("interp/blocks.1.mlp.act/gaussian_tc_num_units") is None
    # Width-independent: shares, per-unit TC, d-normalised cos^2, MIG (histogram), k-sparse probes.
    for suffix in ("l0_frac", "dead_frac", "gaussian_tc_per_unit_bc", "mean_sq_cos_rel", "mono_share", "mig_hist20",
                   "probe_k1_topic"):
        assert width_independent(f"interp/blocks.1.mlp.act/{suffix}"), suffix
    for suffix in ("l0", "mean_abs_cos", "max_abs_cos", "mig_ksg", "probe_topic", "probe_topic_chance", "num_units"):
        assert not width_independent(f"interp/blocks.1.mlp.act/{suffix}"), suffix
    # The default headline metric is width-independent: l0_frac of the deepest block's MLP...
    fracs = [f"{m}_frac" for m in (L0_BLOCK0, "interp/blocks.10.mlp.act/l0", "interp/blocks.2.mlp.act/l0")]
    assert headline_metrics(fracs + [MONO]) == ["interp/blocks.10.mlp.act/l0_frac"]
    assert headline_metrics(["interp/blocks.0.attn.out/l0_frac", MONO]) == ["interp/blocks.0.attn.out/l0_frac"]
    # ...never a raw l0 (a count of units): without l0_frac, another width-independent metric...
    available = [L0_BLOCK0, "interp/blocks.10.mlp.act/l0", "interp/blocks.2.mlp.act/l0", MONO]
    assert headline_metrics(available) == [MONO]
    assert headline_metrics(["interp/blocks.0.attn.out/l0", MONO]) == [MONO]
    last = "interp/blocks.last.mlp.act/"
    assert headline_metrics([MONO, last + "mono_mean", last + "mig_hist20"]) == [last + "mig_hist20"]
    # ...or none (the user chooses with --metric).
    assert headline_metrics(["interp/blocks.0.attn.out/l0", "interp/blocks.0.mlp.act/mig_ksg"]) == []
    assert headline_metrics([MONO]) == [MONO]
    assert headline_metrics([]) == []
    assert headline_metrics(available, [MONO]) == [MONO]
    assert headline_metrics(available, [L0_BLOCK0]) == [L0_BLOCK0]


def test_pareto_frontier_ties_and_dominated():
    points = [
        (10, 3.0),   # 0 frontier
        (20, 2.0),   # 1 frontier (cheapest)
        (10, 3.0),   # 2 identical to 0: neither dominates the other
        (5, 4.0),    # 3 frontier
        (10, 3.5),   # 4 dominated by 0 (same metric, higher loss)
        (20, 2.5),   # 5 dominated by 1 (same metric, higher loss)
        (30, 2.0),   # 6 dominated by 1 (same loss, worse metric)
        (math.nan, 1.0),  # 7 left out
        (4, 5.0),    # 8 frontier (most interpretable)
        (25, 6.0),   # 9 dominated by everything
    ]
    assert pareto_frontier(points, "lower") == [1, 0, 2, 3, 8]
    # higher is better: (30, 2.0) has the best metric and the lowest loss, so it dominates all others
    assert pareto_frontier(points, "higher") == [6]
    assert pareto_frontier([(1, 1), (2, 2), (3, 3)], "higher") == [0, 1, 2]
    assert pareto_frontier([], "lower") == []
    with pytest.raises(ValueError):
        pareto_frontier(points, "up")


def test_frontier_loss_interpolation():
    # oriented o (higher = better); the dominated (0.5, 9.0) must not bend the curve
    o, loss = [0.0, 1.0, 2.0, 0.5], [1.0, 2.0, 4.0, 9.0]
    assert frontier_loss_at(o, loss, 1.5) == pytest.approx(3.0)
    assert frontier_loss_at(o, loss, 0.5) == pytest.approx(1.5)
    assert frontier_loss_at(o, loss, 2.0) == pytest.approx(4.0)
    assert frontier_loss_at(o, loss, -3.0) == pytest.approx(1.0)  # the cheapest point already reaches it
    assert math.isnan(frontier_loss_at(o, loss, 2.5))


def test_tax_matches_hand_computation(tmp_path):
    table = collect_trials(make_sweep(tmp_path))
    tax = interpretability_tax(table, L0)
    assert tax["direction"] == "lower" and tax["m_star"] == 36.0
    rows = {r["size"]: r for r in tax["rows"]}
    assert [r["size"] for r in tax["rows"]] == ["xs", "s", "m"]
    for size, values in EXPECTED_TAX.items():
        r = rows[size]
        assert r["seeds"] == 2 and r["num_params"] == PARAMS[size]
        assert [r["per_seed"][1], r["per_seed"][2]] == pytest.approx(values)
        assert r["mean"] == pytest.approx(np.mean(values))
        assert r["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        assert r["se"] == pytest.approx(abs(values[0] - values[1]) / 2)
        assert r["t_crit"] == pytest.approx(12.7062, abs=1e-4)  # t(0.975, 1)
        # 9, 11, 5 SE from zero: beyond 2 SE, within 12.71 SE
        assert 2 * r["se"] < r["mean"] < r["t_crit"] * r["se"], size
        assert r["verdict"] == INDISTINGUISHABLE and r["distinguishable"] is False, size
    assert rows["xs"]["mean"] == pytest.approx(0.09) and rows["s"]["mean"] == pytest.approx(0.154)
    assert rows["xs"]["se"] == pytest.approx(0.01) and rows["m"]["se"] == pytest.approx(0.05)
    assert any("depends on the model's width" in w for w in tax["warnings"])  # l0 across 3 sizes

    # target l0 <= 30: m seed 2 (best 36) does not reach it and is left out
    tax = interpretability_tax(table, L0, target=30.0)
    rows = {r["size"]: r for r in tax["rows"]}
    assert rows["xs"]["per_seed"] == pytest.approx({1: 0.2, 2: 0.25})
    assert rows["s"]["per_seed"] == pytest.approx({1: 0.2, 2: 0.24})
    assert rows["m"]["per_seed"] == pytest.approx({1: 0.375}) and rows["m"]["seeds"] == 1
    assert rows["m"]["std"] == 0.0 and rows["m"]["mean"] == pytest.approx(0.375)
    assert rows["m"]["verdict"] == ONE_SEED and math.isnan(rows["m"]["t_crit"]) and math.isnan(rows["m"]["se"])
    assert any("seed 2" in n and "does not reach" in n for n in tax["notes"])

    # a target every base trial already meets: the cheapest point answers, tax 0
    tax = interpretability_tax(table, L0, target=70.0)
    assert all(r["mean"] == pytest.approx(0.0) for r in tax["rows"])

    # higher-is-better metric: mono_share = 1/l0, m* = 1/36 again
    tax = interpretability_tax(table, MONO)
    assert tax["m_star"] == pytest.approx(1 / 36)
    assert {r["size"]: r["per_seed"][2] for r in tax["rows"]}["m"] == pytest.approx(0.2)


def test_plots_are_pngs(reported):
    import matplotlib.image as mpimg

    for name in ("pareto_xs.png", "pareto_s.png", "pareto_m.png", "tax.png"):
        image = mpimg.imread(reported / "plots" / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
    assert sorted(p.name for p in (reported / "plots").iterdir()) == [
        "pareto_m.png", "pareto_s.png", "pareto_xs.png", "tax.png"]


def test_report_markdown(reported):
    text = (reported / "report.md").read_text()
    assert text.startswith("# Sweep report: handmade")
    assert "](plots/tax.png)" in text and "](plots/pareto_xs.png)" in text
    # --metric l0 (a count of units) across three widths: a warning, listed under its heading
    warnings = text.split("## Warnings\n\n")[1].split("\n\n")[0]
    assert warnings.startswith(f"- {L0} depends on the model's width")
    assert "- size xs: cannot judge convergence: fewer than 2 eval points (seeds 1, 2)" in warnings  # no histories
    # tax table rows: size, params, metric, m*, mean, std, seeds
    assert f"| xs | 1000 | {L0} | <= 36 | 0.09 | {0.02 / math.sqrt(2):.4g} | 2 | 0.01 | 12.71 | {INDISTINGUISHABLE} |" \
        in text
    assert RULE in text
    assert f"| s | 4000 | {L0} | <= 36 | 0.154 | {0.028 / math.sqrt(2):.4g} | 2 |" in text
    assert f"| m | 16000 | {L0} | <= 36 | 0.25 | {0.1 / math.sqrt(2):.4g} | 2 |" in text
    # trials table: the failed trial with its status, a completed one with its numbers
    assert "| t012-xs-0.1-seed1 | xs | regularizers.0.coeff=0.1 | 1 | 1000 | 2048 | failed: RuntimeError: boom |" in text
    assert "| t007-s-0.01-seed2 | s | regularizers.0.coeff=0.01 | 2 | 4000 | 2048 | completed | 2.9 | 25 |" in text
    # frontier table of size m (pooled seeds) for l0: (60, 2.0), (36, 2.3), (28, 2.4)
    section = text.split("### Size m")[1].split("\n#")[0]
    l0_rows = [line for line in section.splitlines() if line.startswith(f"| {L0} |")]
    assert [line.split(" | ")[-2:] for line in l0_rows] == [["60", "2 |"], ["36", "2.3 |"], ["28", "2.4 |"]]


def test_cli_prints_paths_and_tax(tmp_path, capsys):
    root = make_sweep(tmp_path / "sweep", sizes=("m",))  # one size: fewer figures to draw
    assert main(["report", str(root), "--metric", L0, "--target", "30"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {root / 'summary.parquet'}" in out and f"wrote {root / 'report.md'}" in out
    assert "0.375" in out  # size m at l0 <= 30 (one seed)
    assert "does not reach" in out
    (row,) = [line for line in out.splitlines() if line.startswith("m ")]
    assert row.endswith(ONE_SEED) and row.split()[-7:-4] == ["nan", "nan", "0.07071"]  # SE, t crit, base sd
    assert "|mean| > t(0.975, n-1) x SE (Student's t, two-sided 95%)" in out


def test_no_baseline_skips_tax(tmp_path):
    root = tmp_path / "sweep"
    for i, (l0, loss) in enumerate([(20, 3.4), (30, 3.0)]):
        (root / "runs" / f"t{i}").mkdir(parents=True)
        (root / "runs" / f"t{i}" / "trial.json").write_text(json.dumps(_trial(f"t{i}", "xs", 0.01 * (i + 1), 1, l0, loss)))
    result = write_report(root)
    assert result["taxes"] == []
    assert not (root / "plots" / "tax.png").exists() and (root / "plots" / "pareto_xs.png").is_file()
    assert "Not computed: the sweep has no completed baseline trial" in (root / "report.md").read_text()
    # Each trial's deepest block (here block 1) is also reported as blocks.last.
    assert interp_metrics(collect_trials(root)) == [L0_BLOCK0, L0, MONO, "interp/blocks.last.mlp.act/l0",
                                                    "interp/blocks.last.mlp.act/mono_share"]


def test_architectural_sparsity_is_not_a_baseline(tmp_path):
    """A top-k MLP trial has no regularizer weight but is a frontier point, not a baseline:
    its loss enters the tax against the dense trial of the same seed."""
    root = tmp_path / "sweep"
    trials = [("t0", 0.0, {}, 40, 3.0), ("t1", 0.0, {"mlp_topk": 8}, 20, 3.3)]
    for name, coeff, options, l0, loss in trials:
        record = {**_trial(name, "xs", coeff, 1, l0, loss), "sparsity_options": options}
        (root / "runs" / name).mkdir(parents=True)
        (root / "runs" / name / "trial.json").write_text(json.dumps(record))
    table = collect_trials(root)
    assert table.column("baseline").to_pylist() == [True, False]
    result = write_report(root, metrics=[L0], target=20)
    (tax,) = result["taxes"]
    (row,) = tax["rows"]
    assert row["size"] == "xs" and row["per_seed"][1] == pytest.approx(0.3)


def test_no_width_independent_metric_no_default_tax(tmp_path):
    """Trials with a raw l0 only (no num_units, so no l0_frac): no default headline metric and
    no tax, and report.md says to choose one; --metric still works."""
    root = tmp_path / "sweep"
    for i, (coeff, l0, loss) in enumerate([(0.0, 40, 3.0), (0.01, 20, 3.4)]):
        record = _trial(f"t{i}", "xs", coeff, 1, l0, loss)
        record["final"] = {"eval/loss": loss, L0: l0}
        (root / "runs" / f"t{i}").mkdir(parents=True)
        (root / "runs" / f"t{i}" / "trial.json").write_text(json.dumps(record))
    result = write_report(root)
    assert result["metrics"] == [] and result["taxes"] == []
    assert "no width-independent interpretability metric to default to" in (root / "report.md").read_text()
    assert write_report(root, metrics=[L0])["taxes"][0]["rows"][0]["per_seed"] == {1: pytest.approx(0.4)}  # m* = 20


def test_derived_metrics_compare_across_depth_and_width():
    two_blocks = {"interp/blocks.0.mlp.act/l0": 30.0, "interp/blocks.0.mlp.act/num_units": 128.0,
                  "interp/blocks.1.mlp.act/l0": 16.0, "interp/blocks.1.mlp.act/num_units": 64.0,
                  "interp/embed/l0": 8.0, "eval/loss": 3.0}
    got = derived_metrics(two_blocks)
    assert got["interp/blocks.0.mlp.act/l0_frac"] == 30 / 128
    assert got["interp/blocks.1.mlp.act/l0_frac"] == 0.25
    assert got["interp/blocks.last.mlp.act/l0_frac"] == 0.25 and got["interp/blocks.last.mlp.act/l0"] == 16.0
    assert "interp/embed/l0_frac" not in got  # no num_units: no share
    assert derived_metrics({"eval/loss": 3.0}) == {}
    assert headline_metrics(sorted({**two_blocks, **got})) == ["interp/blocks.last.mlp.act/l0_frac"]


def test_default_headline_is_width_independent(tmp_path):
    """The same sweep with MLP widths xs 64, s 128, m 256 units: the default headline metric
    is interp/blocks.last.mlp.act/l0_frac = l0 / num_units. Per (size, seed), (l0_frac, loss):

        xs seed 1: (0.625, 3.0) (0.3125, 3.4)       xs seed 2: (0.625, 3.1) (0.375, 3.5)
        s  seed 1: (0.390625, 2.5) (0.234375, 2.7)  s  seed 2: (0.390625, 2.6) (0.1953125, 2.9)
        m  seed 1: (0.234375, 2.0) (0.109375, 2.4)  m  seed 2: (0.234375, 2.1) (0.140625, 2.3)

    m* = max(0.3125, 0.375, 0.234375, 0.1953125, 0.109375, 0.140625) = 0.375; the tax:

        xs: 0.4 * 0.25/0.3125 = 0.32, 0.4 (a point)                 mean 0.36
        s : 0.2 * 0.015625/0.15625 = 0.02, 0.3 * 0.08 = 0.024      mean 0.022
        m : 0, 0 (the baselines already reach it)                  mean 0

    The raw l0 tax (module docstring: 0.09, 0.154, 0.25) ranks the sizes the other way round:
    37.5% of 256 units is more than 36 active units."""
    root = make_sweep(tmp_path / "sweep", units={"xs": 64, "s": 128, "m": 256})
    result = write_report(root)
    headline = "interp/blocks.last.mlp.act/l0_frac"
    assert result["metrics"] == [headline]
    (tax,) = result["taxes"]
    assert tax["metric"] == headline and tax["direction"] == "lower" and tax["m_star"] == pytest.approx(0.375)
    rows = {r["size"]: r for r in tax["rows"]}
    for size, values in {"xs": [0.32, 0.4], "s": [0.02, 0.024], "m": [0.0, 0.0]}.items():
        assert [rows[size]["per_seed"][1], rows[size]["per_seed"][2]] == pytest.approx(values, abs=1e-12), size
    assert rows["xs"]["mean"] == pytest.approx(0.36) and rows["s"]["mean"] == pytest.approx(0.022)
    # 9 and 11 SE (SE 0.04, 0.002) with two seeds: within t(0.975, 1) = 12.71 SE; m has no spread and no tax.
    assert rows["xs"]["se"] == pytest.approx(0.04) and rows["s"]["se"] == pytest.approx(0.002)
    assert [rows[s]["verdict"] for s in ("xs", "s", "m")] == [INDISTINGUISHABLE] * 3
    assert DISTINGUISHABLE not in [r["verdict"] for r in tax["rows"]]
    assert not any("depends on the model's width" in w for w in tax["warnings"] + tax["notes"])
    # The default plots: the headline site's width-independent metrics and its block's cos^2.
    available = interp_metrics(collect_trials(root))
    assert pareto_metrics(available, [headline]) == [headline, "interp/blocks.last.mlp.act/mono_share",
                                                     "interp/blocks.last.mlp.fc1/mean_sq_cos_rel"]
    text = (root / "report.md").read_text()
    assert f"| xs | 1000 | {headline} | <= 0.375 | 0.36 |" in text
    assert f"| {headline} | lower | comparable |" in text


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tti: error: ")
    return err


def test_user_errors(tmp_path, capsys):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="does not exist"):
        collect_trials(missing)
    assert "does not exist" in _error(capsys, ["report", str(missing)])

    empty = tmp_path / "empty"
    (empty / "runs" / "t0").mkdir(parents=True)
    assert "holds no trials (no runs/*/trial.json); is it a tti sweep --out directory?" in _error(
        capsys, ["report", str(empty)])

    bad = tmp_path / "bad"
    (bad / "runs" / "t0").mkdir(parents=True)
    (bad / "runs" / "t0" / "trial.json").write_text("{not json")
    err = _error(capsys, ["report", str(bad)])
    assert str(bad / "runs" / "t0" / "trial.json") in err and "not valid JSON" in err

    good = make_sweep(tmp_path / "good")
    err = _error(capsys, ["report", str(good), "--metric", "interp/blocks.9.mlp.act/l0"])
    assert "--metric: 'interp/blocks.9.mlp.act/l0'" in err and L0 in err
    err = _error(capsys, ["report", str(good), "--metric", "interp/blocks.1.mlp.act/probe_topic_chance"])
    assert "--metric" in err
    assert "--target" in _error(capsys, ["report", str(good), "--target", "nan"])
    assert not (good / "summary.parquet").exists()  # errors come before any output
