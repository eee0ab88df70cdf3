"""The `logging.wandb` section: its fields, its checks, the one-line error when the wandb
package is missing (through the real `tti` entry point, before any process or file), mode
disabled writing nothing, and a sweep's trials grouped by the sweep's name.

The package's absence is simulated the way Python itself records a module that must not be
imported (`sys.modules[name] = None`: find_spec answers None and `import` raises).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from tti_dist.cli import main as tti_main
from tti_dist.config import load_config, validate_config
from tti_dist.config.load import config_from_dict
from tti_dist.config.schema import WandbConfig
from tti_dist.errors import ConfigError
from tti_dist.metrics import MetricsWriter
from tti_dist.orchestrate.sweep_config import load_sweep

ROOT = Path(__file__).resolve().parents[2]


def _cfg(wandb):
    return config_from_dict({"logging": {"wandb": wandb}})


def test_fields_and_defaults():
    cfg = _cfg({"project": "p", "mode": "offline", "entity": "team", "group": "g", "name": "n", "tags": ["a", "b"]})
    assert cfg.logging.wandb == WandbConfig(project="p", mode="offline", entity="team", group="g", name="n",
                                            tags=("a", "b"))
    assert _cfg({"project": "p"}).logging.wandb == WandbConfig(project="p", mode="online")
    assert config_from_dict({}).logging.wandb is None


@pytest.mark.parametrize("wandb, message", [
    ({"project": "p", "mode": "offlne"},
     "logging.wandb.mode: 'offlne' is not allowed; choose one of 'online', 'offline', 'disabled'"),
    ({"project": "p", "projct": "q"}, "logging.wandb.projct: unknown key; did you mean 'project'?"),
    ({"project": "p", "tags": "a"}, "logging.wandb.tags: expected a list, got 'a'"),
])
def test_load_errors(wandb, message):
    with pytest.raises(ConfigError) as err:
        _cfg(wandb)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("wandb, message", [
    ({"mode": "offline"}, "logging.wandb.project: None; name the W&B project to log to"),
    ({"project": " "}, "logging.wandb.project: ' '; name the W&B project to log to"),
    ({"project": "p", "group": ""}, "logging.wandb.group: '' must be a non-empty string or null"),
    ({"project": "p", "tags": ["ok", ""]}, "logging.wandb.tags[1]: '' must be a non-empty string"),
])
def test_validation_errors(wandb, message):
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg(wandb))
    assert str(err.value) == message


def test_missing_package_is_exit_2_before_anything_starts(tmp_path, capsys, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"logging": {"wandb": {"project": "p", "mode": "offline"}}}))
    monkeypatch.setitem(sys.modules, "wandb", None)
    code = tti_main(["train", str(config), "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "tti: error: logging.wandb: mode 'offline' needs the wandb package, which is not installed; pip install "
        "wandb (or the tti_dist[wandb] extra), or remove logging.wandb"]
    assert not (tmp_path / "run").exists()
    # Mode disabled needs no package and opens no W&B run.
    validate_config(_cfg({"project": "p", "mode": "disabled"}))
    with MetricsWriter(tmp_path / "r", wandb=WandbConfig(project="p", mode="disabled")) as writer:
        writer.log(1, 10, {"train/task_loss": 1.0})
    assert not (tmp_path / "r" / "wandb").exists()


def test_sweep_trials_are_grouped_by_the_sweep_name(tmp_path):
    base = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    base["logging"] = {"wandb": {"project": "p", "mode": "offline"}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = tmp_path / "grid.yaml"
    sweep.write_text(yaml.safe_dump({"name": "lr-grid", "base": "base.yaml", "axes": {"optim.lr": [1e-3, 3e-3]}}))
    trials = load_sweep(sweep).trials
    assert [t.cfg.logging.wandb.group for t in trials] == ["lr-grid", "lr-grid"]
    assert [t.cfg.logging.wandb.name for t in trials] == [None, None]  # the run directory's name (the trial's)
    # A group the config sets is kept.
    base["logging"]["wandb"]["group"] = "mine"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    assert {t.cfg.logging.wandb.group for t in load_sweep(sweep).trials} == {"mine"}
    # A plain run config has no group.
    assert load_config(tmp_path / "base.yaml").logging.wandb.group == "mine"
