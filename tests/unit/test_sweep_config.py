"""Sweep files: expansion into trials and the one-line errors, all before Ray starts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tti_dist.cli import main
from tti_dist.errors import ConfigError
from tti_dist.models.layout import model_layout
from tti_dist.orchestrate.presets import MODEL_SIZES
from tti_dist.orchestrate.sweep_config import load_sweep
from tti_dist.orchestrate.sweep_prepare import trial_specs
from tti_dist.orchestrate.sweep_resources import check_resources, concurrent_trials, embedded_resources

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "configs" / "scaling_base.yaml"


def _sweep(tmp_path, **doc) -> Path:
    doc.setdefault("base", str(BASE))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_demo_sweep_expands_to_the_grid():
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "demo.yaml")
    assert len(sweep.trials) == 2 * 2 * 3
    first, last = sweep.trials[0], sweep.trials[-1]
    assert first.name == "t000-xs-coefficient0.0-seed1" and last.name == "t011-m-coefficient0.3-seed3"
    assert first.model_size == "xs" and first.cfg.model.hidden_size == MODEL_SIZES["xs"]["hidden_size"]
    assert last.cfg.model.num_layers == MODEL_SIZES["m"]["num_layers"]
    assert last.cfg.regularizers[0].coefficient == 0.3 and last.cfg.train.seed == 3
    assert all(t.cfg.train.steps == 1000 and t.cfg.train.eval_every == 100 for t in sweep.trials)
    # Trials that differ only by seed share a setting label.
    assert sweep.trials[0].setting == sweep.trials[1].setting == "regularizers.0.coefficient=0.0"
    assert {t.setting for t in sweep.trials} == {"regularizers.0.coefficient=0.0", "regularizers.0.coefficient=0.3"}


def test_cpu_scaling_sweep_sizes_budgets_and_methods():
    """configs/sweeps/scaling_cpu.yaml: 3 seeds x 5 sizes (each with its own token budget) x
    7 settings; the top-k settings are model options, so they carry sparsity options."""
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "scaling_cpu.yaml")
    assert len(sweep.trials) == 3 * 5 * 7
    steps = {t.model_size: t.cfg.train.steps for t in sweep.trials}
    assert steps == {"xxs": 350, "xs": 400, "s": 450, "m": 500, "l": 550}
    params = {t.model_size: model_layout(t.cfg.model).num_parameters for t in sweep.trials}
    assert params["l"] / params["xxs"] >= 30  # the span the study claims
    assert {t.cfg.data.source for t in sweep.trials} == {"shakespeare"}
    topk = [t for t in sweep.trials if t.axes["method"].startswith("topk")]
    assert len(topk) == 3 * 5 * 3 and all(t.cfg.model.sparsity_options() == {"mlp_topk": t.cfg.model.mlp_topk}
                                          for t in topk)
    baselines = [t for t in sweep.trials if t.axes["method"] == "baseline"]
    assert all(not t.cfg.model.sparsity_options() and t.cfg.regularizers[0].coefficient == 0 for t in baselines)
    assert [t.cfg.train.seed for t in sweep.trials[:35]] == [1] * 35  # seeds first: a cut study keeps whole seeds


def test_mapping_axis_sets_several_keys_and_overrides_apply_to_all(tmp_path):
    path = _sweep(tmp_path, axes={"reg": [{"name": "none", "regularizers.0.coefficient": 0},
                                          {"name": "l1", "regularizers.0.coefficient": 0.1, "model.mlp_topk": 8}]})
    sweep = load_sweep(path, ["train.steps=7"])
    assert [t.axes for t in sweep.trials] == [{"reg": "none"}, {"reg": "l1"}]
    assert [t.cfg.model.mlp_topk for t in sweep.trials] == [0, 8]
    assert all(t.cfg.train.steps == 7 for t in sweep.trials)
    assert sweep.trials[1].setting == "reg=l1"


def test_a_run_config_is_a_one_trial_sweep():
    sweep = load_sweep(BASE)
    assert len(sweep.trials) == 1 and sweep.trials[0].setting == "base" and sweep.name == "scaling_base"


@pytest.mark.parametrize("doc, message", [
    ({"axes": {"regularizers.0.coef": [0.1]}}, "sweep.axes.regularizers.0.coef: regularizers[0].coef: unknown key for type 'l1'"),
    ({"axes": {"model.hidden_sise": [64]}}, "sweep.axes.model.hidden_sise: model.hidden_sise: unknown key"),
    ({"axes": {"model_size": ["huge"]}}, "sweep.axes.model_size: unknown model size 'huge'"),
    ({"axes": {"train.seed": []}}, "sweep.axes.train.seed: [] must be a non-empty list"),
    ({"axis": {}}, "sweep.axis: unknown key"),
    ({"axes": {}, "resources": {"cpus": 2}}, "sweep.resources.cpus: unknown key"),
    ({"axes": {}, "resources": {"placement_strategy": "RANDOM"}}, "sweep.resources.placement_strategy: 'RANDOM'"),
    ({"axes": {"parallel.tp_size": [1, 3]}}, "sweep.axes.parallel.tp_size: parallel.tp_size: 3 must divide"),
    # Each value is valid alone; the combination is not (mlp_topk above the xs MLP width).
    ({"axes": {"model_size": ["xs", "l"], "model.mlp_topk": [200]}}, "trial t000-xs-mlp_topk200 (model_size=xs, "
                                                                      "model.mlp_topk=200): model.mlp_topk: 200"),
    ({"axes": {}, "max_failures": -1}, "sweep.max_failures: -1 must be an integer >= 0"),
    ({"axes": {}, "base": "missing.yaml"}, "does not exist"),
])
def test_bad_sweeps_are_one_line_errors(tmp_path, doc, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(_sweep(tmp_path, **doc))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_trial_larger_than_the_machine_is_refused_before_anything_runs(tmp_path, capsys):
    path = _sweep(tmp_path, axes={"model_size": ["xs"]}, resources={"cpus_per_worker": 64})
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tti: error: trial t000-xs: its layout") and "needs 64.1 CPU" in err
    assert "\n" not in err
    assert not out.exists()


def test_resource_arithmetic(tmp_path):
    sweep = load_sweep(BASE, ["parallel.dp_size=2"])
    specs = trial_specs(sweep, "/tmp/unused")
    assert specs[0].required_resources() == {"CPU": pytest.approx(2.1)}
    # 2 workers + 0.1 driver: 5 CPUs hold 2 such trials at once, 2.1 hold one.
    assert concurrent_trials(specs, {"CPU": 5.0}, 0) == 2
    assert concurrent_trials(specs, {"CPU": 5.0}, 1) == 1
    assert concurrent_trials(specs, {"CPU": 2.1}, 0) == 1
    check_resources(specs, {"CPU": 2.1}, "here")
    with pytest.raises(ConfigError, match="needs 2.1 CPU but here has 2"):
        check_resources(specs, {"CPU": 2.0}, "here")
    gpu = trial_specs(load_sweep(_sweep(tmp_path, axes={}, resources={"gpus_per_worker": 1})), "/tmp/unused")
    with pytest.raises(ConfigError, match="needs 1 GPU but there has 0"):
        check_resources(gpu, {"CPU": 8.0}, "there")
    assert embedded_resources()["CPU"] >= 2


def test_unreachable_address_is_a_one_line_error_in_seconds(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tti_dist.cli", "sweep", str(BASE), "--address", "127.0.0.1:1",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("tti: error: --address: nothing answers at 127.0.0.1:1")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert time.monotonic() - start < 60
    assert not (tmp_path / "o").exists()
