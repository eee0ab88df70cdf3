"""Regularizer interface: schedules (closed forms), config parsing and validation, static hookpoint names,
the registries."""

from __future__ import annotations

import dataclasses
import math

import pytest

from tti_dist.models.layout import gpt_hookpoint_names
from tti_dist.config.schema import ModelConfig
from tti_dist.errors import ConfigError
from tti_dist.config.regularizers import (
    CONFIG_TYPES,
    L1Config,
    RegularizerTypeConfig,
    SAERegularizerConfig,
    ScheduleConfig,
    parse_regularizers,
    register_config,
)
from tti_dist.regularizers import REGISTRY, Regularizer, checked_regularizers, register
from tti_dist.regularizers.l1 import L1Activation
from tti_dist.config.sae import SAEConfig

CFG = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_seq_len=16)


def test_schedules_closed_forms():
    assert [ScheduleConfig().factor(s) for s in (0, 7, 10_000)] == [1.0, 1.0, 1.0]
    w = ScheduleConfig(kind="linear_warmup", start_step=10, warmup_steps=4)
    assert [w.factor(s) for s in (9, 10, 11, 12, 13, 14)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    lin = ScheduleConfig(kind="linear_anneal", anneal_steps=10, final_ratio=0.2)
    assert lin.factor(0) == 1.0 and lin.factor(5) == pytest.approx(0.6) and lin.factor(10) == pytest.approx(0.2)
    assert lin.factor(50) == pytest.approx(0.2)
    cos = ScheduleConfig(kind="cosine_anneal", anneal_steps=10, final_ratio=0.0)
    assert cos.factor(0) == 1.0 and cos.factor(5) == pytest.approx(0.5) and cos.factor(10) == pytest.approx(0.0)
    assert cos.factor(3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
    window = ScheduleConfig(start_step=5, stop_step=8)
    assert [window.factor(s) for s in range(4, 10)] == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_static_hookpoint_names_match_the_built_model():
    """The names validation uses before launch are exactly those of a built GPT."""
    import torch

    from tti_dist.capture import list_hookpoints
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel, single_process_env
    from tti_dist.models.gpt import GPT

    with single_process_env():
        groups = init_parallel(1, torch.device("cpu"), 60)
        try:
            assert [hp.name for hp in list_hookpoints(GPT(CFG, groups))] == gpt_hookpoint_names(CFG)
        finally:
            shutdown_parallel()


def _error(entries) -> str:
    with pytest.raises(ConfigError) as info:
        checked_regularizers(entries, CFG)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_parse_accepts_and_defaults():
    (reg,) = checked_regularizers([{"type": "l1", "coefficient": "1e-3", "hookpoints": "blocks.*.mlp.act"}], CFG)
    assert reg.name == "l1" and reg.coefficient == 0.001 and reg.hookpoints == ("blocks.*.mlp.act",)
    assert reg.schedule == ScheduleConfig() and reg.params == L1Config() and reg.where == "regularizers[0]"


@pytest.mark.parametrize("entries, message", [
    ([{"type": "l7"}], "regularizers[0].type: 'l7' is not a known regularizer; choose one of"),
    ([{"type": "l1", "coefficient": -1, "hookpoints": ["embed"]}], "regularizers[0].coefficient: -1 must be a finite number >= 0"),
    ([{"type": "l1", "coefficient": float("nan"), "hookpoints": ["embed"]}], "regularizers[0].coefficient: nan"),
    ([{"type": "l1", "hookpoints": ["blocks.*.mlpp"]}], "regularizers[0].hookpoints[0]: 'blocks.*.mlpp' matches no hookpoint; available: embed, blocks.{0..1}.resid_pre"),
    ([{"type": "l1"}], "regularizers[0].hookpoints: 'l1' needs at least one hookpoint glob"),
    ([{"type": "l1", "hookpoints": ["embed"], "schedule": {"start_step": 10, "stop_step": 5}}],
     "regularizers[0].schedule.stop_step: 5 must be after start_step = 10"),
    ([{"type": "l1", "hookpoints": ["embed"], "schedule": {"kind": "linear_warmup"}}],
     "regularizers[0].schedule.warmup_steps: 0 must be >= 1"),
    ([{"type": "l1", "hookpoints": ["embed"], "schedule": {"kind": "cosine"}}], "regularizers[0].schedule.kind: 'cosine' is not allowed"),
    ([{"type": "l1", "hookpoints": ["embed"], "coefficent": 1}], "regularizers[0].coefficent: unknown key for type 'l1'; did you mean 'coefficient'?"),
    ([{"type": "l1", "hookpoints": ["embed"]}, {"type": "l1", "hookpoints": ["final_norm"]}],
     "regularizers[1].name: 'l1' is already used"),
])
def test_parse_errors(entries, message):
    assert _error(entries).startswith(message)


def test_field_errors_need_no_model():
    """Field-level problems are found when the entries are parsed (config loading), before
    the model is known; only the checks against the model wait for validation."""
    with pytest.raises(ConfigError, match=r"^regularizers\[0\]\.coefficent: unknown key for type 'l1'"):
        parse_regularizers([{"type": "l1", "hookpoints": ["x"], "coefficent": 1}])
    with pytest.raises(ConfigError, match=r"^regularizers\[0\]\.hookpoints: 'orthogonality' acts on weights"):
        parse_regularizers([{"type": "orthogonality", "hookpoints": ["embed"]}])
    (reg,) = parse_regularizers([{"type": "l1", "hookpoints": ["no.such.site"]}])  # the model decides
    assert reg.hookpoints == ("no.such.site",)


def test_registries_refuse_a_duplicate_type_name():
    class AnotherL1(Regularizer):
        Config = L1Config

        def loss(self, acts):
            raise NotImplementedError

    with pytest.raises(ValueError) as info:
        register(AnotherL1)
    msg = str(info.value)
    assert "'l1'" in msg and "L1Activation" in msg and "AnotherL1" in msg
    assert REGISTRY["l1"] is L1Activation

    @dataclasses.dataclass(frozen=True)
    class AnotherL1Config(RegularizerTypeConfig):
        type_name = "l1"

    with pytest.raises(ValueError) as info:
        register_config(AnotherL1Config)
    msg = str(info.value)
    assert "'l1'" in msg and "L1Config" in msg and "AnotherL1Config" in msg
    assert CONFIG_TYPES["l1"] is L1Config


def test_register_needs_the_registered_config_class():
    @dataclasses.dataclass(frozen=True)
    class UnregisteredConfig(RegularizerTypeConfig):
        type_name = "unregistered"

    class Unregistered(Regularizer):
        Config = UnregisteredConfig

        def loss(self, acts):
            raise NotImplementedError

    with pytest.raises(ValueError, match="'unregistered'.*not the settings class registered"):
        register(Unregistered)
    assert "unregistered" not in REGISTRY


def test_every_config_type_has_an_implementation():
    assert set(REGISTRY) == set(CONFIG_TYPES)
    for name, cls in REGISTRY.items():
        assert cls.Config is CONFIG_TYPES[name]


def test_sae_entry_is_the_sae_config():
    """The `sae` type's settings are an SAEConfig (nothing copied): every SAEConfig field with
    the same default, plus the co-training fields, parsed from one flat entry."""
    import dataclasses

    entry = SAERegularizerConfig(num_latents=64, k=4, aux_k=None, b_pre_init="zeros")
    assert isinstance(entry, SAEConfig)
    sae_fields = {f.name: f.default for f in dataclasses.fields(SAEConfig)}
    assert {f.name: f.default for f in dataclasses.fields(SAERegularizerConfig) if f.name in sae_fields} == sae_fields
    assert (entry.num_latents, entry.k, entry.aux_k, entry.b_pre_init) == (64, 4, None, "zeros")
    entry.validate(32, 2, "regularizers[0]")  # SAEConfig's own checks
