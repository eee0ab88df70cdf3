"""Every config shipped in configs/ loads and passes validation (before any process starts),
for the number of processes its layout needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tti_dist.config import load_config
from tti_dist.regularizers.validation import validate_run_config

_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(p for p in [*_CONFIG_DIR.glob("*.yaml"), *_CONFIG_DIR.glob("experiments/*.yaml")]
                 if not p.name.startswith("toy_"))
"""`tti train` configs (configs/ and configs/experiments/); toy_*.yaml are `tti toy` configs,
checked in tests/unit/test_toy_models.py."""


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"smoke.yaml", "moe_synth.yaml", "smoke_regularized.yaml",
                                         "lai_joint_sae.yaml", "scaling_cpu_base.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_validates(path):
    cfg = load_config(str(path), [])
    validate_run_config(cfg, world_size=cfg.parallel.world_size)
