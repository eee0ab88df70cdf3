"""User errors of the `tti` command line, through the real entry point in subprocesses.

Each case must fail before anything is launched: exit code 2, exactly one non-empty stderr
line `tti: error: ...` naming the field, no traceback, and nothing written to the run
directory (which proves validation ran before any process group or file output).

Starting the CLI costs a few seconds of imports, so all subprocess cases are started at once
by a module fixture and the tests only inspect their results. Further cases of the same
pre-launch checks run in-process through `prepare_train` (what `tti train` calls before
launching anything).
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "smoke.yaml")
TIMEOUT_S = 120


@dataclass
class Case:
    args: list[str]
    """Arguments after `tti` ({run} is replaced by the case's run directory)."""
    field: str
    """Text the error line must contain (the field path)."""
    pre_existing_run_dir: bool = False
    """Create the run directory (empty) before running."""
    console_script: bool = False
    """Run through the installed `tti` console script instead of `python -m tti_dist.cli`."""


CASES: dict[str, Case] = {
    "unknown_key": Case(
        ["train", SMOKE, "--set", "model.hiden_size=64", "--run-dir", "{run}"],
        "model.hiden_size: unknown key; did you mean 'hidden_size'?",
        console_script=True,
    ),
    "tp_not_dividing_heads": Case(
        ["train", SMOKE, "--set", "parallel.tp_size=3", "--run-dir", "{run}"],
        "parallel.tp_size: 3 must divide model.num_heads = 4",
    ),
    "world_size_mismatch": Case(
        ["train", SMOKE, "--nproc", "3", "--run-dir", "{run}"],
        "parallel: tp_size * dp_size = 2 * 1 = 2 but the job has 3 processes",
    ),
    "missing_data_path": Case(
        ["train", SMOKE, "--set", "data.source=/nonexistent/tti-corpus", "--run-dir", "{run}"],
        "data.source: '/nonexistent/tti-corpus' does not exist",
    ),
    "split_too_small_for_batch": Case(
        ["train", SMOKE, "--set", "train.micro_batch_size=100000", "--run-dir", "{run}"],
        "train.micro_batch_size: 100000 x data-parallel size 1 = 100000 windows per micro-step, but the train split has only",
    ),
    "regularizer_k_above_local_width": Case(
        ["train", SMOKE, "--set", "regularizers=[{type: orthogonality, weights: [blocks.*.mlp.fc1], mode: sampled_local, k: 400}]",
         "--run-dir", "{run}"],
        "regularizers[0].k: 400 exceeds the local width 256 of blocks.0.mlp.fc1",
    ),
    "orthogonality_on_moe_mlp": Case(
        ["train", SMOKE, "--set", "model.moe_num_experts=2",
         "--set", "regularizers=[{type: orthogonality, weights: [blocks.*.mlp.fc1]}]", "--run-dir", "{run}"],
        "regularizers[0].weights[0]: 'blocks.*.mlp.fc1' matches no linear layer (blocks 0..3 are MoE blocks with "
        "model.moe_num_experts 2: no mlp.fc1 / mlp.fc2, and their experts are not targetable); "
        "available: blocks.{0..3}.attn.qkv, blocks.{0..3}.attn.proj",
    ),
    "mlp_topk_above_width": Case(
        ["train", SMOKE, "--set", "model.mlp_topk=600", "--run-dir", "{run}"],
        "model.mlp_topk: 600 must be in 0..ffn_size (512)",
    ),
    "moe_experts_not_divisible_by_ep": Case(
        ["train", SMOKE, "--set", "model.moe_num_experts=3", "--set", "parallel.tp_size=1",
         "--set", "parallel.dp_size=2", "--set", "parallel.ep_size=2", "--run-dir", "{run}"],
        "model.moe_num_experts: 3 is not divisible by parallel.ep_size = 2",
    ),
    "moe_with_zero3": Case(
        ["train", SMOKE, "--set", "model.moe_num_experts=4", "--set", "zero.stage=3", "--run-dir", "{run}"],
        "zero.stage: 3 is not supported with model.moe_num_experts > 0",
    ),
    "moe_top_k_above_experts": Case(
        ["train", SMOKE, "--set", "model.moe_num_experts=4", "--set", "model.moe_top_k=5", "--run-dir", "{run}"],
        "model.moe_top_k: 5 must be in 1..moe_num_experts (4)",
    ),
    "negative_lr": Case(
        ["train", SMOKE, "--set", "optim.lr=-1e-3", "--run-dir", "{run}"],
        "optim.lr: -0.001 must be > 0",
    ),
    "resume_empty_run_dir": Case(
        ["train", SMOKE, "--resume", "--run-dir", "{run}"],
        "--resume: '{run}' holds no complete checkpoint",
        pre_existing_run_dir=True,
    ),
    "bad_set_syntax": Case(
        ["train", SMOKE, "--set", "train.steps", "--run-dir", "{run}"],
        "--set: 'train.steps' must look like section.key=value",
    ),
    "export_not_a_run": Case(
        ["export", "{run}", "--out", "{run}/model.safetensors"],
        "RUN: '{run}' is not a tti run directory",
        pre_existing_run_dir=True,
    ),
}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    cwd: Path


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Result]:
    base = tmp_path_factory.mktemp("cli")
    script = Path(sys.executable).parent / "tti"
    procs = {}
    for name, case in CASES.items():
        cwd = base / f"cwd-{name}"
        cwd.mkdir()
        run_dir = base / f"run-{name}"
        if case.pre_existing_run_dir:
            run_dir.mkdir()
        args = [a.replace("{run}", str(run_dir)) for a in case.args]
        if case.console_script:
            assert script.is_file(), f"console script not installed at {script}"
            cmd = [str(script), *args]
        else:
            cmd = [sys.executable, "-m", "tti_dist.cli", *args]
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[name] = (proc, run_dir, cwd)
    out = {}
    try:
        for name, (proc, run_dir, cwd) in procs.items():
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
            out[name] = Result(proc.returncode, stdout, stderr, run_dir, cwd)
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_exit_2(results, name):
    case, res = CASES[name], results[name]
    assert res.returncode == 2, (res.stdout, res.stderr)
    # Progress logs (rank-prefixed, e.g. "building dataset ...") may precede the error;
    # the error itself is exactly one line.
    lines = [line for line in res.stderr.splitlines()
             if line.strip() and not re.match(r"^\d\d:\d\d:\d\d \[rank \d+/\d+\] (INFO|DEBUG) ", line)]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("tti: error: "), lines[0]
    assert case.field.replace("{run}", str(res.run_dir)) in lines[0]
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    assert res.stdout == ""


@pytest.mark.parametrize("name", list(CASES))
def test_nothing_written(results, name):
    case, res = CASES[name], results[name]
    if case.pre_existing_run_dir:
        assert sorted(p.name for p in res.run_dir.iterdir()) == []
    else:
        assert not res.run_dir.exists()
    # No default runs/<name>-<time> directory (or anything else) in the working directory.
    assert list(res.cwd.iterdir()) == []


# --------------------------------------------------------------------------- in-process


def prepare(argv: list[str]):
    from tti_dist.cli import build_parser
    from tti_dist.commands.train import prepare_train

    return prepare_train(build_parser().parse_args(argv))


def prepare_error(argv: list[str]) -> str:
    from tti_dist.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        prepare(argv)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def fake_checkpoint(run_dir: Path, step: int = 5, ranks: int = 2) -> None:
    """The minimum `latest_tag` accepts as a complete checkpoint, with the per-rank RNG files
    `tti train --resume` reads before launch."""
    from tti_dist.rundir import rng_file_name
    from tti_dist.train.checkpoint import write_rng_state

    ckpt = run_dir / "checkpoints"
    (ckpt / f"global_step{step}").mkdir(parents=True)
    for rank in range(ranks):
        write_rng_state(ckpt / f"global_step{step}" / rng_file_name(rank))
    (ckpt / "latest").write_text(f"global_step{step}")


def test_resume_without_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prepare_error(["train", SMOKE, "--resume"]) == "--resume: needs --run-dir naming the run to continue"
    assert list(tmp_path.iterdir()) == []


def test_missing_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nope.yaml"
    msg = prepare_error(["train", str(missing), "--run-dir", str(tmp_path / "run")])
    assert msg == f"config: '{missing}' does not exist or is not a file"
    assert list(tmp_path.iterdir()) == []


def test_nproc_zero(tmp_path):
    msg = prepare_error(["train", SMOKE, "--nproc", "0", "--run-dir", str(tmp_path / "run")])
    assert msg == "--nproc: 0 must be >= 1"
    assert not (tmp_path / "run").exists()


def test_cuda_device_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    msg = prepare_error(["train", SMOKE, "--set", "train.device=cuda", "--run-dir", str(tmp_path / "run")])
    assert msg == "train.device: 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'"
    assert not (tmp_path / "run").exists()


def test_existing_checkpoints_need_resume(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run)
    msg = prepare_error(["train", SMOKE, "--run-dir", str(run)])
    assert msg.startswith(f"--run-dir: '{run}' already holds checkpoints; pass --resume")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


def test_resume_with_changed_model_is_rejected(tmp_path):
    from tti_dist.config import dump_config, load_config

    run = tmp_path / "run"
    fake_checkpoint(run)
    dump_config(load_config(SMOKE), run / "config.yaml")  # the checkpointed run's resolved config
    saved = (run / "config.yaml").read_text()
    msg = prepare_error(["train", SMOKE, "--resume", "--run-dir", str(run), "--set", "model.hidden_size=64"])
    assert msg == "model.hidden_size: 64 differs from the checkpointed run's 128; resume needs the same value"
    msg = prepare_error(["train", SMOKE, "--resume", "--run-dir", str(run), "--set", "zero.stage=2"])
    assert msg == "zero.stage: 2 differs from the checkpointed run's 1; resume needs the same value"
    assert (run / "config.yaml").read_text() == saved
    # Settings outside model/parallel/zero.stage may change on resume.
    cfg, run_dir, nproc = prepare(["train", SMOKE, "--resume", "--run-dir", str(run), "--set", "train.steps=80"])
    assert cfg.train.steps == 80 and run_dir == run and nproc == 2


def test_resume_refuses_checkpoints_of_another_engine_stage(tmp_path):
    """SMOKE is ZeRO-1 at dp_size 1, which runs as stage 0; checkpoints written by a stage-1
    engine (before that change) cannot be read by it: one line, not DeepSpeed's traceback."""
    import json

    from tti_dist.config import dump_config, load_config

    run = tmp_path / "run"
    fake_checkpoint(run)
    dump_config(load_config(SMOKE), run / "config.yaml")
    (run / "deepspeed_config.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    msg = prepare_error(["train", SMOKE, "--resume", "--run-dir", str(run)])
    assert msg == ("zero.stage: this run's checkpoints were written by a ZeRO stage-1 engine, and zero.stage 1 at "
                   "parallel.dp_size 1 runs stage 0; resume is not possible across that change: start a new run "
                   "(tti export keeps the weights)")
    (run / "deepspeed_config.json").write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    cfg, run_dir, _ = prepare(["train", SMOKE, "--resume", "--run-dir", str(run)])
    assert run_dir == run


def test_run_dir_that_is_a_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    msg = prepare_error(["train", SMOKE, "--run-dir", str(target)])
    assert msg == f"--run-dir: '{target}' is a file, not a directory; name a new or existing run directory"
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_and_config_import_no_torch():
    """`tti --help`, `tti report` and the config loader stay light: building the parser and
    loading a config import neither torch nor megatron (each verb loads its own dependencies)."""
    code = ("import sys, tti_dist.cli, tti_dist.config; tti_dist.cli.build_parser(); "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'deepspeed', 'ray')]; "
            "assert not heavy, heavy[:5]")
    subprocess.run([sys.executable, "-c", code], check=True)
