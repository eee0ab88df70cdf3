"""Tests of the typed run config: loading, `--set` overrides, validation, dumping, and the
DeepSpeed JSON generated from it.

Every user error must be a one-line `ConfigError` naming the field path and the bad value
(the CLI prints it and exits 2); the tests check the exact message fragments.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from tti_dist.config import (
    ModelConfig,
    RunConfig,
    apply_override,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    validate_config,
)
from tti_dist.config.regularizers import L1Config, RegularizerConfig, ScheduleConfig
from tti_dist.distributed.zero_config import deepspeed_config, engine_zero_stage
from tti_dist.errors import ConfigError
from tti_dist.regularizers.validation import validate_run_config

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


def config_error(fn, *args, **kwargs) -> str:
    """Run `fn`, expect a ConfigError, and return its message after checking it is one line."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, f"multi-line error: {msg!r}"
    assert msg.strip() == msg and msg
    return msg


def validation_error(overrides: list[str], world_size: int | None = None) -> str:
    """The error of loading and fully validating the defaults with `overrides` (a regularizer
    entry's field errors come from loading, its checks against the model from validation)."""
    return config_error(lambda: validate_run_config(load_config(None, overrides), world_size=world_size))


# --------------------------------------------------------------------------- loading


def test_defaults_load_and_validate():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.model.hidden_size == 128 and cfg.model.num_layers == 4
    assert cfg.optim.lr == 3e-3
    assert cfg.parallel.world_size == 1
    assert cfg.regularizers == ()
    validate_config(cfg)
    validate_config(cfg, world_size=1)


def test_smoke_yaml_loads_and_validates_for_two_processes():
    cfg = load_config(SMOKE)
    validate_config(cfg, world_size=2)
    assert cfg.parallel.tp_size == 2 and cfg.parallel.dp_size == 1
    assert cfg.parallel.world_size == 2
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 128 and cfg.model.max_seq_len == 128
    assert cfg.optim.lr == 0.003 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 50 and cfg.optim.warmup_steps == 5
    assert cfg.checkpoint.keep_last == 2
    # Fields not in the file keep their defaults.
    assert cfg.train.device == "auto" and cfg.logging.tensorboard is True
    # The smoke layout needs exactly two processes.
    msg = config_error(validate_config, cfg, world_size=1)
    assert "parallel" in msg and "2" in msg and "1 processes" in msg


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == RunConfig()


def test_missing_and_malformed_files(tmp_path):
    msg = config_error(load_config, tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "does not exist" in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    msg = config_error(load_config, bad)
    assert "bad.yaml" in msg and "not valid YAML" in msg
    top_list = tmp_path / "list.yaml"
    top_list.write_text("- 1\n- 2\n")
    msg = config_error(load_config, top_list)
    assert "list.yaml" in msg and "list" in msg


# --------------------------------------------------------------------------- overrides


def test_override_int():
    cfg = load_config(None, ["train.steps=20"])
    assert cfg.train.steps == 20 and type(cfg.train.steps) is int


def test_override_float_in_exponent_form_without_dot():
    # YAML 1.1 reads '1e-3' as the string "1e-3"; the schema must still make it a float.
    cfg = load_config(None, ["optim.lr=1e-3"])
    assert cfg.optim.lr == 0.001 and type(cfg.optim.lr) is float
    # Also from a file.
    cfg = config_from_dict({"optim": {"lr": "2e-4", "min_lr_ratio": 0}})
    assert cfg.optim.lr == 0.0002 and type(cfg.optim.lr) is float
    assert cfg.optim.min_lr_ratio == 0.0 and type(cfg.optim.min_lr_ratio) is float


def test_override_int_given_as_integral_float():
    cfg = load_config(None, ["train.steps=30.0"])
    assert cfg.train.steps == 30 and type(cfg.train.steps) is int


def test_override_bool():
    cfg = load_config(None, ["model.tie_embeddings=false", "logging.parquet=true"])
    assert cfg.model.tie_embeddings is False
    assert cfg.logging.parquet is True


def test_override_literal():
    cfg = load_config(None, ["model.position_embedding=rope", "train.precision=bf16"])
    assert cfg.model.position_embedding == "rope"
    assert cfg.train.precision == "bf16"
    msg = config_error(load_config, None, ["train.device=tpu"])
    assert msg.startswith("train.device:") and "'tpu'" in msg and "'cpu'" in msg and "'cuda'" in msg


def test_override_optional_int():
    cfg = load_config(None, ["model.ffn_hidden_size=96"])
    assert cfg.model.ffn_hidden_size == 96 and cfg.model.ffn_size == 96
    cfg = load_config(None, ["model.ffn_hidden_size=96", "model.ffn_hidden_size=null"])
    assert cfg.model.ffn_hidden_size is None and cfg.model.ffn_size == 4 * 128
    msg = config_error(load_config, None, ["model.ffn_hidden_size=abc"])
    assert msg.startswith("model.ffn_hidden_size:") and "'abc'" in msg


def test_override_applies_on_top_of_file():
    cfg = load_config(SMOKE, ["train.steps=7", "optim.warmup_steps=2"])
    assert cfg.train.steps == 7 and cfg.optim.warmup_steps == 2
    assert cfg.parallel.tp_size == 2  # untouched file value


def test_override_later_wins():
    cfg = load_config(None, ["train.steps=7", "train.steps=9"])
    assert cfg.train.steps == 9


def test_override_nested_new_key_is_an_error():
    msg = config_error(load_config, None, ["model.foo.bar=1"])
    assert msg.startswith("model.foo: unknown key")
    msg = config_error(load_config, None, ["modle.hidden_size=64"])
    assert msg.startswith("modle: unknown key") and "did you mean 'model'" in msg


def test_override_into_a_value_is_an_error():
    raw = {"model": {"hidden_size": 64}}
    msg = config_error(apply_override, raw, "model.hidden_size.x=1")
    assert "'model.hidden_size' is a value, not a section" in msg


def test_override_list_entries_by_index():
    raw = {"regularizers": [{"type": "l1", "coefficient": 1.0}]}
    apply_override(raw, "regularizers.0.coefficient=1e-3")
    # The value is parsed as a YAML scalar (YAML 1.1 reads '1e-3' as a string); a regularizer
    # entry is a free-form mapping that its type validates, so the raw value stays as parsed
    # until the entry is typed when the config is built.
    assert raw["regularizers"][0]["coefficient"] == "1e-3"
    assert config_from_dict(raw).regularizers[0].coefficient == 0.001
    apply_override(raw, "regularizers.0.coefficient=0.5")
    assert raw["regularizers"][0]["coefficient"] == 0.5
    msg = config_error(apply_override, raw, "regularizers.3.coefficient=1")
    assert "index '3' out of range" in msg and "1 entries" in msg


@pytest.mark.parametrize("bad", ["train.steps", "=3", "train..steps=3", ".steps=3"])
def test_override_bad_syntax(bad):
    msg = config_error(apply_override, {}, bad)
    assert msg == f"--set: '{bad}' must look like section.key=value"


# --------------------------------------------------------------------------- unknown keys


def test_unknown_key_from_set_names_closest_key():
    msg = config_error(load_config, None, ["model.hiden_size=64"])
    assert msg.startswith("model.hiden_size: unknown key")
    assert "did you mean 'hidden_size'" in msg
    assert "valid keys:" in msg and "num_heads" in msg


def test_unknown_key_from_file_names_closest_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  hiden_size: 64\n")
    msg = config_error(load_config, path)
    assert msg.startswith("model.hiden_size: unknown key")
    assert "did you mean 'hidden_size'" in msg


def test_unknown_top_level_section_from_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("optimizer:\n  lr: 0.1\n")
    msg = config_error(load_config, path)
    assert msg.startswith("optimizer: unknown key") and "valid keys: model, parallel" in msg


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = config_error(load_config, None, ["zero.zzzzzzzz=1"])
    assert msg.startswith("zero.zzzzzzzz: unknown key")
    assert "did you mean" not in msg
    assert "valid keys: stage, overlap_comm, reduce_bucket_size, allgather_bucket_size" in msg


# --------------------------------------------------------------------------- type errors


@pytest.mark.parametrize(
    "override, field, shown",
    [
        ("train.steps=2.5", "train.steps", "2.5"),
        ("train.steps=abc", "train.steps", "'abc'"),
        ("train.steps=true", "train.steps", "True"),
        ("optim.lr=abc", "optim.lr", "'abc'"),
        ("optim.lr=true", "optim.lr", "True"),
        ("model.tie_embeddings=maybe", "model.tie_embeddings", "'maybe'"),
        ("model.tie_embeddings=1", "model.tie_embeddings", "1"),
        ("data.source=5", "data.source", "5"),
        ("model=3", "model", "3"),
    ],
)
def test_type_error_names_field_and_value(override, field, shown):
    msg = config_error(load_config, None, [override])
    assert msg.startswith(f"{field}: ")
    assert shown in msg


def test_type_error_in_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("train:\n  micro_batch_size: eight\n")
    msg = config_error(load_config, path)
    assert msg == "train.micro_batch_size: expected an integer, got 'eight'"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, world_size, fragments",
    [
        # tp_size must divide the number of heads (4 by default).
        (["parallel.tp_size=3"], None, ["parallel.tp_size:", "3", "model.num_heads = 4"]),
        # world size must equal tp * dp.
        (["parallel.tp_size=2", "parallel.dp_size=2"], 3, ["parallel", "tp_size", "dp_size", "= 4", "3 processes"]),
        (["zero.stage=4"], None, ["zero.stage:", "4", "0, 1, 2 or 3"]),
        (["optim.lr=-1e-3"], None, ["optim.lr:", "-0.001", "> 0"]),
        (["optim.warmup_steps=60", "train.steps=50"], None, ["optim.warmup_steps:", "60", "train.steps = 50"]),
        # warmup must end before the last step, which the schedule puts at the LR floor.
        (["optim.warmup_steps=50", "train.steps=50"], None, ["optim.warmup_steps:", "50", "< train.steps = 50"]),
        (["data.seq_len=512"], None, ["data.seq_len:", "512", "model.max_seq_len = 256"]),
        (["data.source=/nonexistent/tti/corpus.txt"], None, ["data.source:", "'/nonexistent/tti/corpus.txt'", "does not exist"]),
        (["model.dropout=1.0"], None, ["model.dropout:", "1.0", "[0, 1)"]),
        (["model.mlp_topk=513"], None, ["model.mlp_topk:", "513", "0..ffn_size (512)"]),
        (["model.mlp_topk=-1"], None, ["model.mlp_topk:", "-1"]),
        (["model.mlp_mask_density=0.0"], None, ["model.mlp_mask_density:", "0.0", "(0, 1]"]),
        (["model.mlp_mask_density=1.5"], None, ["model.mlp_mask_density:", "1.5"]),
        (["model.mlp_mask_density=0.25", "model.mlp_topk=200"], None,
         ["model.mlp_topk:", "200", "exceeds the 128 units the hard mask keeps"]),
        (["model.bottleneck_layer=4"], None, ["model.bottleneck_layer:", "4", "0..3"]),
        (["model.bottleneck_layer=1", "model.bottleneck_dim=0"], None, ["model.bottleneck_dim:", "0", "> 0"]),
        (["model.bottleneck_layer=1", "model.bottleneck_dim=5", "parallel.tp_size=2"], None,
         ["parallel.tp_size:", "2", "model.bottleneck_dim = 5"]),
        (["model.dropout=-0.1"], None, ["model.dropout:", "-0.1"]),
        (
            ["model.position_embedding=rope", "model.hidden_size=12", "model.num_heads=4"],
            None,
            ["model.position_embedding:", "'rope'", "even head dimension", "= 3"],
        ),
        (["model.hidden_size=130"], None, ["model.num_heads:", "4", "model.hidden_size (130)"]),
        (["optim.min_lr_ratio=1.5"], None, ["optim.min_lr_ratio:", "1.5", "[0, 1]"]),
        (["optim.beta2=1.0"], None, ["optim.beta2:", "1.0"]),
        (["train.micro_batch_size=0"], None, ["train.micro_batch_size:", "0", "> 0"]),
        (["data.val_fraction=0"], None, ["data.val_fraction:", "0", "(0, 1)"]),
        (["model.vocab_size=100"], None, ["model.vocab_size:", "100", "257"]),
        (["regularizers=[{type: l2}]"], None, ["regularizers[0].type:", "'l2'", "not a known regularizer"]),
        (["model.moe_num_experts=4", "model.moe_top_k=5"], None, ["model.moe_top_k:", "5", "1..moe_num_experts (4)"]),
        (["model.moe_num_experts=4", "model.moe_top_k=0"], None, ["model.moe_top_k:", "0"]),
        (["model.moe_num_experts=6", "parallel.dp_size=4", "parallel.ep_size=4"], None,
         ["model.moe_num_experts:", "6", "not divisible by parallel.ep_size = 4"]),
        (["model.moe_num_experts=4", "parallel.dp_size=2", "parallel.ep_size=4"], None,
         ["parallel.ep_size:", "4", "must divide parallel.dp_size = 2"]),
        (["parallel.ep_size=2", "parallel.dp_size=2"], None, ["parallel.ep_size:", "2", "needs an MoE model"]),
        (["model.moe_num_experts=4", "zero.stage=3"], None, ["zero.stage:", "3", "not supported with model.moe_num_experts"]),
        (["model.moe_num_experts=4", "model.moe_layer_interval=5"], None, ["model.moe_layer_interval:", "5", "1..num_layers (4)"]),
        (["model.moe_num_experts=4", "model.moe_capacity_factor=0"], None, ["model.moe_capacity_factor:", "0", "> 0"]),
        (["model.moe_num_experts=4", "model.moe_min_capacity=5000"], None,
         ["model.moe_min_capacity:", "5000", "0..1024"]),
        (["model.moe_num_experts=4", "model.moe_ffn_hidden_size=33", "parallel.tp_size=2"], None,
         ["parallel.tp_size:", "2", "model.moe_ffn_hidden_size (ffn_size when null) = 33"]),
        (["model.moe_num_experts=-1"], None, ["model.moe_num_experts:", "-1", ">= 0"]),
    ],
    ids=[
        "tp_not_dividing_heads", "world_size_mismatch", "zero_stage_4", "negative_lr", "warmup_gt_steps", "warmup_eq_steps",
        "seq_len_gt_max", "missing_data_source", "dropout_1",
        "topk_above_width", "topk_negative", "mask_density_zero", "mask_density_above_1", "topk_above_masked_width",
        "bottleneck_layer_out_of_range", "bottleneck_dim_zero", "tp_not_dividing_bottleneck_dim",
        "dropout_negative", "rope_odd_head_dim",
        "heads_not_dividing_hidden", "min_lr_ratio", "beta2", "micro_batch_0", "val_fraction_0",
        "small_vocab", "unknown_regularizer",
        "moe_top_k_above_experts", "moe_top_k_zero", "moe_experts_not_divisible_by_ep", "moe_ep_not_dividing_dp",
        "ep_without_moe", "moe_zero3", "moe_layer_interval", "moe_capacity_factor_zero", "moe_min_capacity_above_tokens",
        "moe_tp_not_dividing_expert_ffn", "moe_negative_experts",
    ],
)
def test_validation_errors_are_one_line_with_field_and_value(overrides, world_size, fragments):
    msg = validation_error(overrides, world_size)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert msg.startswith(fragments[0])


def test_validation_exact_messages():
    assert validation_error(["parallel.tp_size=3"]) == "parallel.tp_size: 3 must divide model.num_heads = 4"
    assert validation_error([], world_size=3) == (
        "parallel: tp_size * dp_size = 1 * 1 = 1 but the job has 3 processes; make them equal"
    )
    assert validation_error(["optim.lr=-1e-3"]) == "optim.lr: -0.001 must be > 0"


def test_tp_must_divide_padded_vocab_and_ffn():
    # 6 heads, hidden 96: tp 6 divides heads, hidden and ffn (384), but with a pad multiple of
    # 64 the padded vocabulary is 320, which 6 does not divide.
    msg = validation_error(
        ["model.num_heads=6", "model.hidden_size=96", "parallel.tp_size=6", "model.vocab_pad_multiple=64"]
    )
    assert msg == "parallel.tp_size: 6 must divide model.vocab_size (padded to vocab_pad_multiple) = 320"
    msg = validation_error(["parallel.tp_size=2", "model.ffn_hidden_size=99"])
    assert msg == "parallel.tp_size: 2 must divide model.ffn_hidden_size = 99"


def test_validation_accepts_edge_values(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello\n")
    cfg = load_config(
        None,
        [
            "optim.warmup_steps=49", "train.steps=50",  # one decay step after warmup
            "data.seq_len=256",  # == model.max_seq_len
            f"data.source={corpus}",
            "zero.stage=3", "model.dropout=0.0",
            "model.position_embedding=rope",  # head dim 32 is even
            "parallel.tp_size=4", "parallel.dp_size=2",
        ],
    )
    validate_config(cfg, world_size=8)


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.lr=.inf", "optim.grad_clip=nan"])
def test_validation_rejects_non_finite_numbers(override):
    msg = validation_error([override])
    assert msg.startswith(override.split("=")[0] + ":")


# --------------------------------------------------------------------------- dump / round trip


def test_dump_and_load_round_trip(tmp_path):
    cfg = load_config(
        SMOKE,
        [
            "optim.lr=1e-3", "model.ffn_hidden_size=384", "model.position_embedding=rope",
            "train.device=cpu", "regularizers=[{type: l1, coefficient: 0.5, hookpoints: [blocks.*.mlp.act]}]",
        ],
    )
    path = tmp_path / "config.yaml"
    dump_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert isinstance(again.regularizers, tuple)
    assert again.regularizers[0] == RegularizerConfig(0, "l1", "l1", 0.5, ("blocks.*.mlp.act",), ScheduleConfig(),
                                                      L1Config())
    # The entries are written resolved, every key explicit, like the sections.
    assert yaml.safe_load(path.read_text())["regularizers"] == [
        {"type": "l1", "name": "l1", "coefficient": 0.5, "hookpoints": ["blocks.*.mlp.act"],
         "schedule": {"kind": "constant", "start_step": 0, "stop_step": None, "warmup_steps": 0,
                      "anneal_steps": 0, "final_ratio": 0.0}}]
    # The defaults round-trip too, including ffn_hidden_size: None.
    dump_config(RunConfig(), path)
    assert load_config(path) == RunConfig()
    assert "ffn_hidden_size: null" in path.read_text()


def test_config_to_dict_is_plain_and_complete():
    cfg = load_config(None, ["regularizers=[{type: l1}]"])
    d = config_to_dict(cfg)
    assert list(d) == [f.name for f in dataclasses.fields(RunConfig)]
    assert d["regularizers"] == [{"type": "l1", "name": "l1", "coefficient": 0.0, "hookpoints": [],
                                  "schedule": config_to_dict(ScheduleConfig())}]
    assert d["model"]["hidden_size"] == 128
    assert config_from_dict(d) == cfg


def test_configs_are_frozen():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.hidden_size = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- deepspeed JSON


def test_deepspeed_config_batch_and_optimizer():
    cfg = load_config(
        None,
        ["train.micro_batch_size=3", "train.grad_accum_steps=5", "optim.grad_clip=0.5", "optim.lr=2e-4",
         "optim.beta1=0.8", "optim.beta2=0.99", "optim.eps=1e-6", "optim.weight_decay=0.05", "zero.stage=2"],
    )
    ds = deepspeed_config(cfg, dp_size=4, bf16=True, on_cuda=True)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 4 == 60
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True}
    assert ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["allgather_bucket_size"] == 50_000_000
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"] == {
        "lr": 2e-4, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.05, "torch_adam": True, "fused": True,
    }


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("on_cuda, bf16", [(False, False), (True, True), (True, False)])
def test_deepspeed_config_stage_precision_and_adam(stage, on_cuda, bf16):
    cfg = load_config(None, [f"zero.stage={stage}", "parallel.dp_size=2"])
    ds = deepspeed_config(cfg, dp_size=2, bf16=bf16, on_cuda=on_cuda)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] is bf16
    # torch's AdamW everywhere (DeepSpeed's FusedAdam needs nvcc at first use), fused on CUDA.
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["optimizer"]["params"]["fused"] is on_cuda
    assert ds["train_batch_size"] == 16
    assert ("allgather_bucket_size" in ds["zero_optimization"]) is (stage in (1, 2))


@pytest.mark.parametrize("stage, dp_size, engine_stage", [(0, 1, 0), (1, 1, 0), (2, 1, 0), (3, 1, 3),
                                                          (1, 2, 1), (2, 4, 2), (3, 2, 3)])
def test_zero_1_and_2_over_one_data_parallel_rank_run_as_stage_0(stage, dp_size, engine_stage):
    """Nothing to shard over one rank: DeepSpeed runs stage 0 (same update, no flat-buffer
    copies), and the DeepSpeed JSON (RUN/deepspeed_config.json) records the stage that ran."""
    cfg = load_config(None, [f"zero.stage={stage}", f"parallel.dp_size={dp_size}"])
    assert engine_zero_stage(cfg) == engine_stage
    ds = deepspeed_config(cfg, dp_size=dp_size, bf16=False, on_cuda=False)
    assert ds["zero_optimization"]["stage"] == engine_stage


def test_deepspeed_config_uses_dp_size_argument():
    cfg = load_config(SMOKE)  # micro 8, accum 1
    assert deepspeed_config(cfg, dp_size=1, bf16=False, on_cuda=False)["train_batch_size"] == 8
    assert deepspeed_config(cfg, dp_size=3, bf16=False, on_cuda=False)["train_batch_size"] == 24
    assert deepspeed_config(cfg, dp_size=1, bf16=False, on_cuda=False)["gradient_clipping"] == 1.0


# --------------------------------------------------------------------------- derived model values


@pytest.mark.parametrize(
    "vocab, multiple, padded",
    [(257, 128, 384), (256, 128, 256), (1, 128, 128), (257, 1, 257), (50257, 128, 50304), (300, 64, 320)],
)
def test_padded_vocab_size(vocab, multiple, padded):
    assert ModelConfig(vocab_size=vocab, vocab_pad_multiple=multiple).padded_vocab_size == padded


def test_ffn_size_default_and_explicit():
    assert ModelConfig().ffn_size == 512
    assert ModelConfig(hidden_size=32).ffn_size == 128
    assert ModelConfig(hidden_size=32, ffn_hidden_size=40).ffn_size == 40


# --------------------------------------------------------------------------- data.tokenizer


def test_data_tokenizer_is_byte_bpe_or_a_json_file(tmp_path, tokenizer_json):
    tok = tokenizer_json(tmp_path / "tok.json", ["<pad>", "</s>"], vocab_size=300)
    no_eos = tokenizer_json(tmp_path / "no-eos.json", ["<sep>"], vocab_size=300)
    missing = tmp_path / "missing.json"
    assert validation_error(["data.tokenizer=wordpiece"]) == (
        "data.tokenizer: 'wordpiece' is not allowed; use byte, bpe or a path to a HuggingFace tokenizer .json file"
    )
    assert validation_error(["data.eos_token=</s>"]) == (
        "data.eos_token: '</s>' is not allowed with data.tokenizer 'byte', whose end-of-document token is "
        "fixed; set it only with a tokenizer .json file, or remove it"
    )
    assert validation_error([f"data.tokenizer={missing}"]).startswith(
        f"data.tokenizer: '{missing}' does not exist or is not a file; use byte, bpe or a path"
    )
    assert validation_error([f"data.tokenizer={no_eos}", "model.vocab_size=300"]) == (
        f"data.tokenizer: '{no_eos}' has no end-of-document token: none of its special tokens (<sep>) is one of "
        "<|endoftext|>, <|end_of_text|>, </s>, <eos>, <|eos|>; name one with data.eos_token"
    )
    assert validation_error([f"data.tokenizer={tok}", "data.eos_token=<eos>", "model.vocab_size=300"]) == (
        f"data.eos_token: '<eos>' is not a token of '{tok}'; its special tokens: <pad>, </s>"
    )
    # The model must hold the file's vocabulary (300 tokens); checked before any build.
    assert validation_error([f"data.tokenizer={tok}"]) == (
        f"model.vocab_size: 257 is smaller than the 300 tokens of data.tokenizer '{tok}'; "
        "set model.vocab_size: 300 or more"
    )
    assert validation_error(["data.tokenizer=bpe"]).startswith(
        "model.vocab_size: 257 is not allowed with data.tokenizer bpe"
    )
    assert validation_error(["data.bpe_sample_bytes=0"]) == "data.bpe_sample_bytes: 0 must be > 0"
    validate_config(load_config(None, [f"data.tokenizer={tok}", "model.vocab_size=300"]))
    validate_config(load_config(None, [f"data.tokenizer={no_eos}", "data.eos_token=<sep>", "model.vocab_size=300"]))
    validate_config(load_config(None, ["data.tokenizer=bpe", "model.vocab_size=512", "data.bpe_sample_bytes=1000"]))


def test_train_compile_refuses_zero3_and_moe_before_launch():
    assert validation_error(["train.compile=true", "zero.stage=3"]) == (
        "train.compile: true is not supported with zero.stage 3 (DeepSpeed's ZeRO-3 parameter hooks split the "
        "compiled graph at every module); use zero.stage 0, 1 or 2, or train.compile false")
    assert validation_error(["train.compile=true", "model.moe_num_experts=2"]) == (
        "train.compile: true is not supported with model.moe_num_experts > 0 (DeepSpeed's MoE gate syncs with "
        "the host inside the forward); use train.compile false")
    for stage in (0, 1, 2):
        load = load_config(None, ["train.compile=true", f"zero.stage={stage}", "train.activation_checkpointing=true"])
        validate_config(load)
