"""Every `tti` command that reads a file tti (or DeepSpeed under tti) wrote refuses a file
carrying a pickle payload: exit code 2, one line `tti: error: PATH: why`, no traceback, and
the payload never runs (its marker file is not created).

One real run (configs/smoke.yaml at TP=1, 2 steps, one checkpoint) and one `tti sae fit` on
it are made once; each case copies them, puts a crafted file in the place of one file the
command reads, and runs the command as a user does (subprocess). The cases run a few at a
time. The same commands on the untouched copies succeed (so a refusal is the file's doing).
The loaders themselves are tested in tests/unit/test_safe_loading.py.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "smoke.yaml")
SITE = "blocks.1.resid_post"
TAG = "global_step2"
RUN_SETTINGS = ["parallel.tp_size=1", "train.steps=2", "optim.warmup_steps=0", "checkpoint.every=2",
                "train.eval_every=0", "data.max_bytes=200000", "logging.progress_bar=false"]
TIMEOUT_S = 300
PARALLEL = 3

pytestmark = pytest.mark.slow


class Payload:
    """Pickles to a call of os.system that touches `marker` (what a hostile file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "tti_dist.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=TIMEOUT_S, env=env)


def _settings(*extra: str) -> list[str]:
    return [a for s in [*RUN_SETTINGS, *extra] for a in ("--set", s)]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """(run directory, `tti sae fit` output directory), never modified by the cases."""
    root = tmp_path_factory.mktemp("safe-loading")
    run, sae = root / "run", root / "sae"
    proc = _cli("train", SMOKE, "--run-dir", str(run), *_settings())
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _cli("sae", "fit", str(run), "--site", SITE, "--latents", "64", "--k", "4", "--steps", "5",
                "--out", str(sae))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in sae.glob("sae_tp_rank*")) == ["sae_tp_rank00.safetensors"]
    assert sorted(p.name for p in (run / "checkpoints" / TAG).iterdir()) == [
        "mp_rank_00_model_states.pt", "rng_rank00000.json", "tp_layout.json"]
    return run, sae


@dataclass
class Case:
    command: list[str]
    """Arguments after `tti`; {run}, {sae} and {out} are the case's copies and an output path."""
    crafted: str | None = None
    """File replaced by the payload, relative to the case directory ("run/..." or "sae/...");
    None runs the command on the untouched copies."""
    reason: str = ""
    """What the error line says after the file's path."""
    remove: list[str] = field(default_factory=list)
    """Files deleted from the copies first (relative like `crafted`)."""


MODEL_STATES = f"run/checkpoints/{TAG}/mp_rank_00_model_states.pt"
PICKLE_REFUSED = "refused to unpickle posix.system (not in tti's allowlist)"
INSPECT = ["inspect", "{run}", "--site", SITE, "--unit", "3", "--top", "2", "--batches", "1"]
RESUME = ["train", SMOKE, "--run-dir", "{run}", "--resume", *_settings("train.steps=3", "checkpoint.every=3")]

CASES = {
    "export": Case(["export", "{run}", "--out", "{out}"], MODEL_STATES, PICKLE_REFUSED),
    "eval": Case(["eval", "{run}", "--batches", "1"], MODEL_STATES, PICKLE_REFUSED),
    "sae_fit": Case(["sae", "fit", "{run}", "--site", SITE, "--latents", "64", "--k", "4", "--steps", "2",
                     "--out", "{out}"], MODEL_STATES, PICKLE_REFUSED),
    "inspect": Case(INSPECT, MODEL_STATES, PICKLE_REFUSED),
    "inspect_sae": Case([*INSPECT, "--sae", "{sae}"], "sae/sae_tp_rank00.safetensors", "not a safetensors SAE shard"),
    "inspect_sae_older_version": Case([*INSPECT, "--sae", "{sae}"], "sae/sae_tp_rank00.pt", PICKLE_REFUSED,
                                      remove=["sae/sae_tp_rank00.safetensors"]),
    "resume_rng": Case(RESUME, f"run/checkpoints/{TAG}/rng_rank00000.json", "not an RNG state file written by tti"),
    "resume_rng_older_version": Case(RESUME, f"run/checkpoints/{TAG}/rng_rank00000.pt", PICKLE_REFUSED,
                                     remove=[f"run/checkpoints/{TAG}/rng_rank00000.json"]),
    # The same commands on genuine files.
    "export_genuine": Case(["export", "{run}", "--out", "{out}"]),
    "inspect_sae_genuine": Case([*INSPECT, "--sae", "{sae}"]),
    "resume_genuine": Case(RESUME),
}


def _run_case(name: str, case: Case, originals, root: Path):
    run, sae = originals
    case_dir = root / name
    shutil.copytree(run, case_dir / "run")
    shutil.copytree(sae, case_dir / "sae")
    for rel in case.remove:
        (case_dir / rel).unlink()
    marker = case_dir / "MARKER"
    if case.crafted:
        torch.save({"module": {"w": torch.zeros(2)}, "x": Payload(marker)}, case_dir / case.crafted)
    args = [a.format(run=case_dir / "run", sae=case_dir / "sae", out=case_dir / "out") for a in case.command]
    return _cli(*args), marker


@pytest.fixture(scope="module")
def outcomes(originals, tmp_path_factory):
    """{case name: (CompletedProcess, marker path)}, the cases run PARALLEL at a time."""
    root = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {name: pool.submit(_run_case, name, case, originals, root) for name, case in CASES.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.crafted])
def test_crafted_file_is_refused_in_one_line(outcomes, name, tmp_path_factory):
    proc, marker = outcomes[name]
    case = CASES[name]
    crafted = marker.parent / case.crafted
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tti: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"tti: error: {crafted}: {case.reason}"), errors[0]
    assert proc.stderr.rstrip().endswith(errors[0])
    assert not marker.exists(), "the pickle payload ran"


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.crafted])
def test_genuine_files_load(outcomes, name):
    proc, _ = outcomes[name]
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_resume_continues_from_the_json_rng_state(outcomes):
    proc, marker = outcomes["resume_genuine"]
    assert "trained to step 3" in proc.stdout
    assert (marker.parent / "run" / "checkpoints" / "global_step3" / "rng_rank00000.json").is_file()
