"""Seeded fuzz of `tti train`'s pre-launch checks with invalid configs and `--set` overrides.

Several hundred cases are generated from the schema itself (every field of every section)
and from hand-written tables: values of the wrong type, out-of-range values (NaN and
infinities included), unknown keys at every level (sections, regularizer entries, their
schedules, a config file's nested mappings), malformed structure, and combinations that
cannot run (tp_size not dividing the heads, MoE with orthogonality on mlp.fc1, compile
with ZeRO-3, ...). Each goes through the CLI's entry point in this process and must:

- exit with code 2, printing nothing on stdout and exactly one line on stderr,
  `tti: error: ...`, that names the field (its dotted path);
- leave torch.distributed uninitialised (no process group was started);
- create no run directory (and nothing in the working directory).

A tripwire replaces the data preparation that follows validation in `tti train`: a case
that passes validation fails the test at once (naming the case) instead of building a
dataset and training. A few cases also run through `python -m tti_dist.cli` in
subprocesses, to check the same through the real process boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import random
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import torch.distributed as dist
import yaml

from tti_dist.config.schema import RunConfig

SEED = 15_07
MOE = ("model.moe_num_experts=2", "model.moe_layer_interval=2")
"""Overrides turning the base into a mixed dense/MoE model (block 1 MoE, block 0 dense)."""


def base_config(corpus: str) -> dict:
    """A small valid config; every case breaks exactly one thing in it (or one combination)."""
    return {
        "model": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "max_seq_len": 32},
        "parallel": {"tp_size": 1, "dp_size": 1},
        "zero": {"stage": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": 10, "micro_batch_size": 2, "eval_every": 5, "eval_batches": 1},
        "data": {"source": corpus, "seq_len": 16, "max_bytes": 100_000},
        "logging": {"log_every": 1, "tensorboard": False, "progress_bar": False},
        "checkpoint": {"every": 5, "keep_last": 1},
        "regularizers": [
            {"type": "l1", "name": "l1_mlp", "coefficient": 1e-3, "hookpoints": ["blocks.*.mlp.act"],
             "schedule": {"kind": "linear_warmup", "warmup_steps": 2}},
            {"type": "orthogonality", "name": "orth", "coefficient": 1e-2, "weights": ["blocks.*.attn.qkv"]},
        ],
    }


@dataclass
class Case:
    name: str
    """Test id."""
    args: list[str]
    """Arguments after `tti train CONFIG` (`--set ...`, `--nproc N`)."""
    field: str
    """The field path the error line must contain."""
    leads: bool = True
    """The error must start with the field path (`tti: error: <field>...`): the message is
    about that field, not a neighbour it happens to mention."""
    file_patch: tuple[tuple, Any] | None = None
    """(key path, value) written into the config file instead of a --set; a key path of ()
    replaces the file's whole text with `value`."""


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


# --------------------------------------------------------------------------- generators


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def _wrong_values(tp: Any) -> list[str]:
    """YAML texts that are not a value of annotation `tp` (None is allowed where tp is Optional)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        inner = [a for a in args if a is not type(None)]
        return _wrong_values(inner[0])
    if dataclasses.is_dataclass(tp):  # a nested section (logging.wandb): not a mapping
        return ["3", "[a, b]", "true", "abc"]
    if origin is Literal:
        return ["bogus_choice", "3", "[x]", "{a: 1}"]
    if tp is bool:
        return ["3", "maybe", "[true]", "1.5", "{a: 1}"]
    if tp is int:
        return ["abc", "[1, 2]", "{a: 1}", "true", "1.5", ".inf", "'7'"]
    if tp is float:
        return ["abc", "[1.0]", "{a: 1}", "false", "one"]
    if tp is str:
        return ["3", "[a, b]", "{a: b}", "true", "1.5"]
    raise AssertionError(f"no wrong values for {tp!r}")


def _section(tp: Any) -> Any:
    """A top-level section's dataclass (`X` or an optional `X | None`, e.g. weight_sparsity)."""
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    return inner[0] if typing.get_origin(tp) is not None and len(inner) == 1 else tp


def wrong_type_cases(rng: random.Random) -> list[Case]:
    """Two wrong-typed values for every scalar field of every section."""
    cases = []
    for section in dataclasses.fields(RunConfig):
        if section.name in ("regularizers", "imports"):  # lists, not sections
            continue
        cls = _section(typing.get_type_hints(RunConfig)[section.name])
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if typing.get_origin(hints[f.name]) is tuple:  # a list of globs: its own cases below
                continue
            for text in rng.sample(_wrong_values(hints[f.name]), 2):
                path = f"{section.name}.{f.name}"
                cases.append(Case(f"type-{path}={text}", _sets(f"{path}={text}"), path))
    return cases


OUT_OF_RANGE: dict[str, list[str]] = {
    "model.num_layers": ["0", "-1"], "model.hidden_size": ["0", "-32"], "model.num_heads": ["0", "-4"],
    "model.ffn_hidden_size": ["0", "-1"], "model.vocab_size": ["0", "-257"],
    "model.vocab_pad_multiple": ["0", "-128"], "model.max_seq_len": ["0", "-1"],
    "model.rope_base": ["0", "-1.0", ".nan", ".inf"], "model.dropout": ["1.0", "-0.1", ".nan", ".inf"],
    "model.layernorm_eps": ["0", "-1e-5", ".nan", "-.inf"], "model.init_std": ["0", "-0.02", ".nan", ".inf"],
    "model.mlp_topk": ["-1", "100000"], "model.mlp_mask_density": ["0", "1.5", "-0.5", ".nan"],
    "model.mlp_mask_seed": ["-1"], "model.bottleneck_layer": ["-1", "2", "99"], "model.bottleneck_dim": ["0", "-8"],
    "model.moe_num_experts": ["-1", "-8"],
    "parallel.tp_size": ["0", "-2"], "parallel.dp_size": ["0", "-1"], "parallel.ep_size": ["0", "-2"],
    "zero.stage": ["4", "-1", "7"], "zero.reduce_bucket_size": ["0", "-5"], "zero.allgather_bucket_size": ["0", "-5"],
    "optim.lr": ["0", "-1.0e-3", ".nan", ".inf", "1e400"], "optim.min_lr_ratio": ["-0.1", "1.5", ".nan"],
    "optim.warmup_steps": ["-1", "10", "11"], "optim.weight_decay": ["-0.1", ".nan", ".inf"],
    "optim.beta1": ["1.0", "-0.5", ".nan"], "optim.beta2": ["1.5", "-1.0", ".nan"], "optim.eps": ["0", "-1e-8", ".nan"],
    "optim.grad_clip": ["-1.0", ".nan", ".inf"],
    "train.steps": ["0", "-5"], "train.micro_batch_size": ["0", "-2"], "train.grad_accum_steps": ["0", "-1"],
    "train.seed": ["-1", "18446744073709551616"], "train.eval_every": ["-1"], "train.eval_batches": ["0", "-1"],
    "train.dist_timeout_s": ["0", "-60"],
    "data.seq_len": ["0", "-16", "33", "1000"], "data.max_bytes": ["0", "-1"], "data.bpe_sample_bytes": ["0", "-1"],
    "data.val_fraction": ["0", "1", "1.5", ".nan"], "data.tokenizer": ["wordpiece", "''"],
    "data.source": ["/nonexistent/tti-corpus.txt", "''"], "data.text_field": ["''"],
    "data.path": ["/nonexistent/tti-dataset", "''"], "data.eos_token": ["'<|endoftext|>'"],
    "logging.log_every": ["0", "-1"], "checkpoint.every": ["-1"], "checkpoint.keep_last": ["-1", "-3"],
    "weight_sparsity.density": ["0", "1.5", "-0.25", ".nan"], "weight_sparsity.anneal_fraction": ["-0.1", "1.5", ".nan"],
    "weight_sparsity.min_per_neuron": ["-1", "100000"], "weight_sparsity.matrices": ["[]", "['blocks.*.mlp.fc9']"],
}
"""Values outside the allowed range of each field (on the dense base config)."""

MOE_OUT_OF_RANGE: dict[str, list[str]] = {
    "model.moe_top_k": ["0", "3", "-1"], "model.moe_layer_interval": ["0", "3", "-2"],
    "model.moe_capacity_factor": ["0", "-1.0", ".nan", ".inf"], "model.moe_eval_capacity_factor": ["0", ".inf", ".nan"],
    "model.moe_min_capacity": ["-1", "100000"], "model.moe_ffn_hidden_size": ["0", "-64"],
}
"""Values outside the allowed range of the MoE fields (on the MoE base config)."""


def out_of_range_cases() -> list[Case]:
    cases = []
    for table, extra in ((OUT_OF_RANGE, ()), (MOE_OUT_OF_RANGE, MOE)):
        for path, values in table.items():
            for text in values:
                cases.append(Case(f"range-{path}={text}", _sets(*extra, f"{path}={text}"), path))
    return cases


def _typo(name: str, rng: random.Random) -> str:
    """A misspelling of `name` (a dropped, doubled or swapped letter, or a suffix)."""
    i = rng.randrange(len(name) - 1)
    kind = rng.choice(["drop", "double", "swap", "suffix"])
    if kind == "drop":
        out = name[:i] + name[i + 1:]
    elif kind == "double":
        out = name[:i] + name[i] + name[i:]
    elif kind == "swap":
        out = name[:i] + name[i + 1] + name[i] + name[i + 2:]
    else:
        out = name + "_x"
    return out if out != name else name + "s"


def unknown_key_cases(rng: random.Random) -> list[Case]:
    """Unknown keys at every level, through --set and through the config file."""
    cases = [Case("unknown-top-level", _sets("bogus=1"), "bogus"),
             Case("unknown-top-level-section", _sets("modle.hidden_size=64"), "modle"),
             Case("unknown-top-level-file", [], "regularisers", file_patch=(("regularisers",), []))]
    hints = typing.get_type_hints(RunConfig)
    for section in dataclasses.fields(RunConfig):
        if section.name in ("regularizers", "imports"):  # lists, not sections
            continue
        names = [f.name for f in dataclasses.fields(_section(hints[section.name]))]
        for real in rng.sample(names, min(3, len(names))):
            key = _typo(real, rng)
            if key in names:
                continue
            cases.append(Case(f"unknown-{section.name}.{key}", _sets(f"{section.name}.{key}=1"),
                              f"{section.name}.{key}"))
            cases.append(Case(f"unknown-file-{section.name}.{key}", [], f"{section.name}.{key}",
                              file_patch=((section.name, key), 1)))
    for i, real in ((0, "coefficient"), (0, "hookpoints"), (1, "weights"), (1, "mode"), (1, "seed")):
        key = _typo(real, rng)
        cases.append(Case(f"unknown-regularizers.{i}.{key}", _sets(f"regularizers.{i}.{key}=1"),
                          f"regularizers[{i}].{key}"))
        cases.append(Case(f"unknown-file-regularizers.{i}.{key}", [], f"regularizers[{i}].{key}",
                          file_patch=(("regularizers", i, key), 1)))
    for real in ("kind", "warmup_steps", "start_step"):
        key = _typo(real, rng)
        cases.append(Case(f"unknown-regularizers.0.schedule.{key}", _sets(f"regularizers.0.schedule.{key}=1"),
                          f"regularizers[0].schedule.{key}"))
        cases.append(Case(f"unknown-file-regularizers.0.schedule.{key}", [], f"regularizers[0].schedule.{key}",
                          file_patch=(("regularizers", 0, "schedule", key), 1)))
    # A key valid for another regularizer type is still unknown for this one.
    cases.append(Case("unknown-regularizers.0.weights", _sets("regularizers.0.weights=[blocks.*.mlp.fc1]"),
                      "regularizers[0].weights"))
    cases.append(Case("unknown-regularizers.1.num_latents", _sets("regularizers.1.num_latents=8"),
                      "regularizers[1].num_latents"))
    return cases


STRUCTURE: list[tuple[str, list[str], str]] = [
    # (name, overrides, field)
    ("section-is-scalar", ["model=3"], "model"),
    ("section-is-list", ["train=[1, 2]"], "train"),
    ("value-is-section", ["model.hidden_size.x=1"], "--set model.hidden_size.x"),
    ("deep-value-is-section", ["train.steps.a.b=1"], "--set train.steps.a.b"),
    ("regularizers-scalar", ["regularizers=3"], "regularizers"),
    ("regularizers-mapping", ["regularizers={type: l1}"], "regularizers"),
    ("regularizer-entry-scalar", ["regularizers=[3]"], "regularizers[0]"),
    ("regularizer-entry-set-scalar", ["regularizers.0=3"], "regularizers[0]"),
    ("regularizer-index-out-of-range", ["regularizers.7.coefficient=1"], "--set regularizers.7"),
    ("regularizer-index-not-a-number", ["regularizers.first.coefficient=1"], "--set regularizers.first"),
    ("regularizer-index-negative", ["regularizers.-1.coefficient=1"], "--set regularizers.-1"),
    ("regularizer-last-index-out-of-range", ["regularizers.2=3"], "--set regularizers.2"),
    ("schedule-scalar", ["regularizers.0.schedule=3"], "regularizers[0].schedule"),
    ("schedule-list", ["regularizers.0.schedule=[linear_warmup]"], "regularizers[0].schedule"),
    ("hookpoints-scalar", ["regularizers.0.hookpoints=3"], "regularizers[0].hookpoints"),
    ("hookpoints-mapping", ["regularizers.0.hookpoints={a: 1}"], "regularizers[0].hookpoints"),
    ("hookpoint-glob-not-a-string", ["regularizers.0.hookpoints=[3]"], "regularizers[0].hookpoints[0]"),
    ("hookpoint-glob-list", ["regularizers.0.hookpoints=[[blocks.*]]"], "regularizers[0].hookpoints[0]"),
    ("hookpoint-into-string", ["regularizers.0.hookpoints.0.x=1"], "--set regularizers.0.hookpoints.0.x"),
    ("weights-scalar", ["regularizers.1.weights=3"], "regularizers[1].weights"),
    ("weights-glob-not-a-string", ["regularizers.1.weights=[3]"], "regularizers[1].weights[0]"),
    ("set-without-value", ["train.steps"], "--set"),
    ("set-empty-key", ["=3"], "--set"),
    ("set-empty-part", ["model..hidden_size=3"], "--set"),
    ("set-trailing-dot", ["model.=3"], "--set"),
]


def structure_cases() -> list[Case]:
    return [Case(f"structure-{name}", _sets(*overrides), path) for name, overrides, path in STRUCTURE]


FILE_CASES: list[tuple[str, tuple, Any, str]] = [
    # (name, key path, value, field): the file's value at the key path is replaced.
    ("file-not-yaml", (), "model: [1, 2\n", "config"),
    ("file-top-level-list", (), "- model\n- train\n", "config"),
    ("file-top-level-scalar", (), "42\n", "config"),
    ("file-section-scalar", ("model",), 3, "model"),
    ("file-section-list", ("optim",), [1, 2], "optim"),
    ("file-int-key", ("model", 7), 1, "model.7"),
    ("file-regularizer-entry-list", ("regularizers", 1), ["orthogonality"], "regularizers[1]"),
    ("file-schedule-null-kind", ("regularizers", 0, "schedule", "kind"), None, "regularizers[0].schedule.kind"),
    ("file-not-utf8", (), b"model: {hidden_size: \xff}\n", "config"),
    # A repeated key: YAML loaders keep the last value silently.
    ("file-duplicate-field", (), "model:\n  hidden_size: 32\n  num_heads: 4\n  hidden_size: 64\n", "model.hidden_size"),
    ("file-duplicate-section", (), "train: {steps: 5}\nmodel: {num_layers: 2}\ntrain: {steps: 6}\n", "train"),
    ("file-duplicate-in-regularizer", (), "regularizers:\n  - {type: l1, hookpoints: [embed], name: a, name: b}\n",
     "regularizers[0].name"),
]


def file_cases() -> list[Case]:
    return [Case(name, [], path, file_patch=(keys, value)) for name, keys, value, path in FILE_CASES]


REGULARIZER_VALUES: list[tuple[str, list[str], str]] = [
    ("type-unknown", ["regularizers.0.type=l2"], "regularizers[0].type"),
    ("type-null", ["regularizers.0.type=null"], "regularizers[0].type"),
    ("type-number", ["regularizers.0.type=1"], "regularizers[0].type"),
    ("name-empty", ["regularizers.0.name=''"], "regularizers[0].name"),
    ("name-slash", ["regularizers.0.name=a/b"], "regularizers[0].name"),
    ("name-list", ["regularizers.0.name=[a]"], "regularizers[0].name"),
    ("name-duplicate", ["regularizers.1.name=l1_mlp"], "regularizers[1].name"),
    ("coefficient-negative", ["regularizers.0.coefficient=-1"], "regularizers[0].coefficient"),
    ("coefficient-nan", ["regularizers.0.coefficient=.nan"], "regularizers[0].coefficient"),
    ("coefficient-inf", ["regularizers.1.coefficient=.inf"], "regularizers[1].coefficient"),
    ("coefficient-text", ["regularizers.0.coefficient=lots"], "regularizers[0].coefficient"),
    ("coefficient-bool", ["regularizers.0.coefficient=true"], "regularizers[0].coefficient"),
    ("coefficient-list", ["regularizers.0.coefficient=[1]"], "regularizers[0].coefficient"),
    ("hookpoints-empty", ["regularizers.0.hookpoints=[]"], "regularizers[0].hookpoints"),
    ("hookpoints-typo", ["regularizers.0.hookpoints=[blocks.*.mlpp]"], "regularizers[0].hookpoints[0]"),
    ("hookpoints-second-glob", ["regularizers.0.hookpoints=[blocks.*.mlp.act, embedd]"],
     "regularizers[0].hookpoints[1]"),
    ("hookpoints-block-out-of-range", ["regularizers.0.hookpoints=[blocks.2.mlp.act]"],
     "regularizers[0].hookpoints[0]"),
    ("hookpoints-token-ids", ["regularizers.0.hookpoints=[tokens]"], "regularizers[0].hookpoints[0]"),
    ("hookpoints-everything", ["regularizers.0.hookpoints=['*']"], "regularizers[0].hookpoints[0]"),
    ("hookpoints-on-weights-type", ["regularizers.1.hookpoints=[blocks.*.mlp.act]"], "regularizers[1].hookpoints"),
    ("schedule-kind", ["regularizers.0.schedule.kind=exponential"], "regularizers[0].schedule.kind"),
    ("schedule-warmup-zero", ["regularizers.0.schedule.warmup_steps=0"], "regularizers[0].schedule.warmup_steps"),
    ("schedule-warmup-text", ["regularizers.0.schedule.warmup_steps=ten"], "regularizers[0].schedule.warmup_steps"),
    ("schedule-start-negative", ["regularizers.0.schedule.start_step=-1"], "regularizers[0].schedule.start_step"),
    ("schedule-stop-before-start", ["regularizers.0.schedule.start_step=5", "regularizers.0.schedule.stop_step=3"],
     "regularizers[0].schedule.stop_step"),
    ("schedule-anneal-zero", ["regularizers.0.schedule.kind=cosine_anneal"], "regularizers[0].schedule.anneal_steps"),
    ("schedule-final-ratio-nan", ["regularizers.0.schedule={kind: linear_anneal, anneal_steps: 3, final_ratio: .nan}"],
     "regularizers[0].schedule.final_ratio"),
    ("weights-empty", ["regularizers.1.weights=[]"], "regularizers[1].weights"),
    ("weights-typo", ["regularizers.1.weights=[blocks.*.attn.qvk]"], "regularizers[1].weights[0]"),
    ("weights-hookpoint-name", ["regularizers.1.weights=[blocks.*.mlp.act]"], "regularizers[1].weights[0]"),
    ("weights-embedding", ["regularizers.1.weights=[embedding]"], "regularizers[1].weights[0]"),
    ("mode-unknown", ["regularizers.1.mode=exact"], "regularizers[1].mode"),
    ("k-with-full", ["regularizers.1.k=4"], "regularizers[1].k"),
    ("k-missing", ["regularizers.1.mode=sampled_local"], "regularizers[1].k"),
    ("k-one", ["regularizers.1.mode=sampled_global", "regularizers.1.k=1"], "regularizers[1].k"),
    ("k-above-width", ["regularizers.1.mode=sampled_local", "regularizers.1.k=97"], "regularizers[1].k"),
    ("k-text", ["regularizers.1.mode=sampled_local", "regularizers.1.k=four"], "regularizers[1].k"),
    ("seed-text", ["regularizers.1.seed=x"], "regularizers[1].seed"),
    ("kl-without-bottleneck", ["regularizers.0.type=kl", "regularizers.0.schedule.kind=constant"],
     "regularizers[0].hookpoints"),
    ("kl-on-mlp", ["model.bottleneck_layer=0", "regularizers.0.type=kl", "regularizers.0.schedule.kind=constant"],
     "regularizers[0].hookpoints"),
    ("sae-on-sharded-site", ["regularizers=[{type: sae, hookpoints: [blocks.0.mlp.act], num_latents: 8, k: 2}]"],
     "regularizers[0].hookpoints"),
    ("sae-two-sites", ["regularizers=[{type: sae, hookpoints: [blocks.*.resid_post], num_latents: 8, k: 2}]"],
     "regularizers[0].hookpoints"),
    ("sae-k-above-latents", ["regularizers=[{type: sae, hookpoints: [blocks.0.resid_post], num_latents: 8, k: 9}]"],
     "regularizers[0].k"),
    ("decorrelation-eps", ["regularizers=[{type: decorrelation, hookpoints: [blocks.0.mlp.act], eps: -1}]"],
     "regularizers[0].eps"),
    ("decorrelation-max-tokens", ["regularizers=[{type: decorrelation, hookpoints: [blocks.0.mlp.act], "
                                  "max_tokens: 1}]"], "regularizers[0].max_tokens"),
    ("load-balance-on-dense-model", ["regularizers=[{type: load_balance, hookpoints: [blocks.*.mlp.act]}]"],
     "regularizers[0].hookpoints"),
]


def regularizer_cases() -> list[Case]:
    return [Case(f"regularizer-{name}", _sets(*overrides), path) for name, overrides, path in REGULARIZER_VALUES]


COMBINATIONS: list[tuple[str, list[str], str, bool]] = [
    # (name, arguments after the config, field, whether the message leads with the field)
    ("tp-not-dividing-heads", _sets("parallel.tp_size=3") + ["--nproc", "3"], "parallel.tp_size", True),
    ("tp-not-dividing-ffn", _sets("model.ffn_hidden_size=33", "parallel.tp_size=2") + ["--nproc", "2"],
     "parallel.tp_size", True),
    ("tp-not-dividing-bottleneck", _sets("model.bottleneck_layer=0", "model.bottleneck_dim=3", "parallel.tp_size=2")
     + ["--nproc", "2"], "parallel.tp_size", True),
    ("tp-not-dividing-expert-ffn", _sets(*MOE, "model.moe_ffn_hidden_size=33", "parallel.tp_size=2")
     + ["--nproc", "2"], "parallel.tp_size", True),
    ("nproc-mismatch", ["--nproc", "3"], "parallel", True),
    ("nproc-zero", ["--nproc", "0"], "--nproc", True),
    ("nproc-negative", ["--nproc", "-2"], "--nproc", True),
    ("heads-not-dividing-hidden", _sets("model.num_heads=5"), "model.num_heads", True),
    ("rope-odd-head-dim", _sets("model.hidden_size=20", "model.position_embedding=rope"),
     "model.position_embedding", True),
    ("moe-orthogonality-fc1", _sets(*MOE, "regularizers.1.weights=[blocks.1.mlp.fc1]"),
     "regularizers[1].weights[0]", True),
    ("moe-orthogonality-fc2-glob", _sets("model.moe_num_experts=2", "regularizers.0.hookpoints=[blocks.*.attn.z]",
                                         "regularizers.1.weights=[blocks.*.mlp.fc2]"),
     "regularizers[1].weights[0]", True),
    ("moe-l1-on-mlp", _sets("model.moe_num_experts=2", "regularizers.0.hookpoints=[blocks.1.mlp.act]"),
     "regularizers[0].hookpoints[0]", True),
    ("moe-zero3", _sets(*MOE, "zero.stage=3"), "zero.stage", True),
    ("moe-compile", _sets(*MOE, "train.compile=true"), "train.compile", True),
    ("compile-zero3", _sets("train.compile=true", "zero.stage=3"), "train.compile", True),
    ("ep-without-moe", _sets("parallel.dp_size=2", "parallel.ep_size=2") + ["--nproc", "2"], "parallel.ep_size", True),
    ("experts-not-divisible-by-ep", _sets("model.moe_num_experts=3", "parallel.dp_size=2", "parallel.ep_size=2")
     + ["--nproc", "2"], "model.moe_num_experts", True),
    ("ep-not-dividing-dp", _sets(*MOE, "parallel.dp_size=3", "parallel.ep_size=2") + ["--nproc", "3"],
     "parallel.ep_size", True),
    ("moe-top-k-above-experts", _sets(*MOE, "model.moe_top_k=3"), "model.moe_top_k", True),
    ("moe-micro-batch-zero", _sets(*MOE, "train.micro_batch_size=0"), "train.micro_batch_size", True),
    ("moe-seq-len-zero", _sets(*MOE, "data.seq_len=0"), "data.seq_len", True),
    ("warmup-not-below-steps", _sets("optim.warmup_steps=10"), "optim.warmup_steps", True),
    ("steps-zero-with-warmup", _sets("train.steps=0"), "train.steps", True),
    ("seq-len-above-max", _sets("data.seq_len=64"), "data.seq_len", True),
    ("topk-above-kept-units", _sets("model.mlp_topk=100", "model.mlp_mask_density=0.5"), "model.mlp_topk", True),
    ("eos-token-with-byte", _sets("data.eos_token=</s>"), "data.eos_token", True),
    ("vocab-below-bytes", _sets("model.vocab_size=200"), "model.vocab_size", True),
    ("bpe-vocab-too-small", _sets("data.tokenizer=bpe", "model.vocab_size=100"), "model.vocab_size", True),
    ("tokenizer-file-missing", _sets("data.tokenizer=/nonexistent/tok.json"), "data.tokenizer", True),
]


def combination_cases() -> list[Case]:
    return [Case(f"combination-{name}", args, path, leads) for name, args, path, leads in COMBINATIONS]


def all_cases() -> list[Case]:
    rng = random.Random(SEED)
    cases = (wrong_type_cases(rng) + out_of_range_cases() + unknown_key_cases(rng) + structure_cases()
             + file_cases() + regularizer_cases() + combination_cases())
    seen: set[str] = set()
    for case in cases:  # unique test ids
        while case.name in seen:
            case.name += "'"
        seen.add(case.name)
    return cases


CASES = all_cases()


# --------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A directory with the corpus and the base config (base.yaml)."""
    root = tmp_path_factory.mktemp("fuzz")
    corpus = root / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 200)
    (root / "base.yaml").write_text(yaml.safe_dump(base_config(str(corpus)), sort_keys=False))
    return root


def _patched(raw: dict, keys: tuple, value: Any) -> dict:
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]  # an optional section: add it
    node[keys[-1]] = value
    return raw


def config_file(case: Case, workspace: Path, tmp_path: Path) -> Path:
    if case.file_patch is None:
        return workspace / "base.yaml"
    keys, value = case.file_patch
    path = tmp_path / "config.yaml"
    if keys == ():
        path.write_bytes(value if isinstance(value, bytes) else value.encode())
    else:
        raw = yaml.safe_load((workspace / "base.yaml").read_text())
        path.write_text(yaml.safe_dump(_patched(raw, keys, value), sort_keys=False))
    return path


class PassedValidation(AssertionError):
    """A case reached the data preparation after validation: it was accepted."""


@pytest.fixture
def tripwire(monkeypatch):
    import tti_dist.commands.train as train_command

    def reached(cfg, run_dir):
        raise PassedValidation(f"the config passed validation (run directory {run_dir})")

    monkeypatch.setattr(train_command, "prepare_run_data", reached)


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the CLI's main function in this process."""
    from tti_dist.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def check_error(code: int, stdout: str, stderr: str, case: Case) -> None:
    lines = stderr.splitlines()
    assert code == 2, (code, stdout, stderr)
    assert stdout == ""
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("tti: error: "), line
    assert case.field in line, f"{case.field!r} not named in: {line}"
    if case.leads:
        assert line.startswith(f"tti: error: {case.field}"), f"does not lead with {case.field!r}: {line}"


def test_there_are_enough_cases():
    assert len(CASES) >= 200
    kinds = {case.name.split("-", 1)[0] for case in CASES}
    assert kinds >= {"type", "range", "unknown", "structure", "file", "regularizer", "combination"}


def test_base_config_is_valid(workspace, tmp_path, monkeypatch, tripwire):
    """Without a mutation the config reaches the data preparation: every failure below is
    the mutation's."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PassedValidation):
        run_main(["train", str(workspace / "base.yaml"), "--run-dir", str(tmp_path / "run")])
    with pytest.raises(PassedValidation):
        run_main(["train", str(workspace / "base.yaml"), *_sets(*MOE), "--run-dir", str(tmp_path / "run")])
    assert not dist.is_initialized()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_invalid_config_is_one_line_exit_2(case, workspace, tmp_path, monkeypatch, tripwire):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run_dir = tmp_path / "run"
    config = config_file(case, workspace, tmp_path)
    assert not dist.is_initialized()
    code, stdout, stderr = run_main(["train", str(config), *case.args, "--run-dir", str(run_dir)])
    check_error(code, stdout, stderr, case)
    assert not dist.is_initialized()
    assert not run_dir.exists()
    assert list(cwd.iterdir()) == []


SUBPROCESS_CASES = 4


def test_sample_through_the_real_entry_point(workspace, tmp_path):
    """A seeded sample of the cases through `python -m tti_dist.cli` (started together)."""
    sample = random.Random(SEED + 1).sample([c for c in CASES if c.file_patch is None], SUBPROCESS_CASES)
    procs = []
    for i, case in enumerate(sample):
        cwd = tmp_path / f"cwd{i}"
        cwd.mkdir()
        run_dir = tmp_path / f"run{i}"
        cmd = [sys.executable, "-m", "tti_dist.cli", "train", str(workspace / "base.yaml"), *case.args,
               "--run-dir", str(run_dir)]
        procs.append((case, cwd, run_dir,
                      subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    try:
        for case, cwd, run_dir, proc in procs:
            stdout, stderr = proc.communicate(timeout=120)
            assert "Traceback" not in stderr
            check_error(proc.returncode, stdout, stderr, case)
            assert not run_dir.exists()
            assert list(cwd.iterdir()) == []
    finally:
        for *_, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
