"""docs/config.md is generated from the schema and must match it; ignored settings are reported."""

from pathlib import Path

from tti_dist.config import ignored_settings, load_config
from tti_dist.config.reference import field_docs, render
from tti_dist.config.schema import ModelConfig, RunConfig

ROOT = Path(__file__).resolve().parents[2]


def test_docs_config_md_is_up_to_date():
    assert (ROOT / "docs" / "config.md").read_text() == render(), (
        "regenerate with: python -m tti_dist.config.reference > docs/config.md"
    )


def test_every_field_is_documented():
    import dataclasses
    import typing

    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        assert f.name in field_docs(RunConfig), f.name
        section = hints[f.name]
        if dataclasses.is_dataclass(section):
            missing = {g.name for g in dataclasses.fields(section)} - set(field_docs(section))
            assert not missing, f"{f.name}: {missing}"
    assert field_docs(ModelConfig)["num_heads"].startswith("Attention heads")


def test_ignored_settings_are_reported():
    assert ignored_settings(load_config(None)) == []
    notes = ignored_settings(load_config(None, [
        "model.rope_base=500", "zero.stage=3", "zero.allgather_bucket_size=1000",
        "train.eval_every=0", "train.eval_batches=9",
    ]))
    assert notes == [
        "model.rope_base: 500.0 is ignored with position_embedding 'learned'",
        "zero.allgather_bucket_size: 1000 is ignored with zero.stage 3 (used by stages 1 and 2)",
        "train.eval_batches: 9 is ignored with train.eval_every 0",
    ]
    assert ignored_settings(load_config(None, ["model.position_embedding=rope", "model.rope_base=500"])) == []
