"""`tti submit` / `tti jobs` against a real Ray head on loopback (one head for the module).

The head runs with token authentication (RAY_AUTH_MODE=token, its token in a temporary
file), as Ray 2.60 heads do by default, so the tests also cover the client finding the
token without RAY_AUTH_MODE being set. Every port is chosen free, so the head does not
collide with other Ray instances on the machine; teardown ends exactly the processes this
head started (`ray stop` would end every Ray process of the user on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
SUCCESS_DEADLINE_S = 240

pytestmark = pytest.mark.skipif(not RAY.exists(), reason="needs the ray CLI next to the test interpreter")

# A ~20k-parameter model on 200 kB of stdlib text; --set in the test makes it 4 steps.
TINY = {
    "model": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "max_seq_len": 32,
              "position_embedding": "learned", "tie_embeddings": True},
    "parallel": {"tp_size": 1, "dp_size": 1},
    "zero": {"stage": 1},
    "optim": {"lr": 3.0e-3, "warmup_steps": 1},
    "train": {"steps": 50, "micro_batch_size": 4, "seed": 7, "eval_every": 0, "eval_batches": 1},
    "data": {"source": "stdlib", "max_bytes": 200_000, "seq_len": 32, "val_fraction": 0.05},
    "logging": {"log_every": 1},
    "checkpoint": {"every": 0, "keep_last": 1},
}
STEPS = 4


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


def _head_processes(session: int) -> set[int]:
    """The head's daemons (they keep the session of `ray start`) and all their descendants."""
    table = _processes()
    found = {pid for pid, (_, sid) in table.items() if sid == session}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in table.items() if ppid in found and pid not in found}
        found |= more
        grew = bool(more)
    return found


def _end_head(session: int) -> None:
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        pids = _head_processes(session)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while _head_processes(session) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _head_processes(session):
            return


class Head:
    def __init__(self, root: Path, address: str, env: dict[str, str]):
        self.root = root
        self.address = address
        self.env = env  # a client environment holding the token, without RAY_AUTH_MODE


@pytest.fixture(scope="module")
def head():
    # A short root: Ray's unix socket paths live under it and must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="tti-rj-", dir="/tmp"))
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    gcs, dash, client, agent_listen, agent_grpc, metrics, env_agent = _free_ports(7)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    # The job's `python` must be this interpreter (tti_dist is installed in it).
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    head_env = dict(env, RAY_AUTH_MODE="token")
    cmd = [str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=3",
           "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={root / 'ray'}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_listen}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={env_agent}"]
    log = open(root / "ray-start.log", "w")
    starter = subprocess.Popen(cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        if starter.wait(timeout=120) != 0:
            pytest.fail(f"ray start failed: {(root / 'ray-start.log').read_text()[-2000:]}")
        _wait_for_dashboard(address, token_file.read_text())
        yield Head(root, address, env)
    finally:
        log.close()
        _end_head(starter.pid)
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_dashboard(address: str, token: str, timeout: float = 60.0) -> None:
    request = urllib.request.Request(address + "/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                json.loads(resp.read())
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def tti(*args: str, env: dict[str, str], cwd: Path | str = REPO, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "tti_dist.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("tti: error: "), proc.stderr
    return lines[-1]


@pytest.fixture
def api_env(head, monkeypatch):
    """This process as a client of the head (library calls)."""
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", head.env["RAY_AUTH_TOKEN_PATH"])
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    return head


@pytest.fixture(scope="module")
def submitted_run(head):
    """A tiny run config submitted through the CLI from a small working directory; the job
    trains while the other tests run, `test_submitted_run_succeeds` (last) waits for it."""
    wd = head.root / "wd"
    wd.mkdir()
    (wd / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    out = head.root / "shared" / "tiny-sweep"  # absolute, as on shared storage
    t0 = time.monotonic()
    proc = tti("submit", "tiny.yaml", "--address", head.address, "--out", str(out),
               "--set", f"train.steps={STEPS}", "--set", "train.micro_batch_size=2", env=head.env, cwd=wd)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().splitlines()[0]
    assert re.fullmatch(r"tti-tiny-\d{8}-\d{6}(-\d+)?", job_id), proc.stdout
    return {"job_id": job_id, "out": out, "submitted_at": t0, "stderr": proc.stderr}


def test_submit_records_the_entrypoint(submitted_run, api_env):
    from tti_dist.orchestrate import jobs

    details = jobs.info(submitted_run["job_id"], api_env.address)
    assert details.entrypoint == (f"python -m tti_dist.cli sweep tiny.yaml --address auto --out {submitted_run['out']} "
                                  f"--set train.steps={STEPS} --set train.micro_batch_size=2")
    assert details.metadata["tti_kind"] == "run"
    assert details.metadata["tti_file"] == "tiny.yaml"
    excludes = details.runtime_env["excludes"]
    assert "/.venv" in excludes and "/runs" in excludes
    assert str(details.status) in ("PENDING", "RUNNING", "SUCCEEDED"), details


def test_stop_a_running_job(api_env):
    from tti_dist.orchestrate import jobs

    job_id = jobs.submit_entrypoint(
        "python -c \"import time; print('sleeper up', flush=True); time.sleep(600)\"", api_env.address,
        submission_id=f"tti-sleeper-{secrets.token_hex(3)}")
    deadline = time.monotonic() + 90
    while jobs.status(job_id, api_env.address) != "RUNNING" or "sleeper up" not in jobs.logs(job_id, api_env.address):
        assert time.monotonic() < deadline, jobs.info(job_id, api_env.address)
        time.sleep(1)
    follower = subprocess.Popen([sys.executable, "-m", "tti_dist.cli", "jobs", "logs", job_id, "--address",
                                 api_env.address, "--follow"], env=api_env.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        proc = tti("jobs", "stop", job_id, "--address", api_env.address, env=api_env.env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"{job_id}: stop requested"
        assert jobs.wait_for(job_id, api_env.address, timeout=60, poll_s=0.5) == "STOPPED"
        # --follow printed the output and ended with the job: exit 1, as the job did not succeed.
        out, err = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 1, err
    assert "sleeper up" in out and f"{job_id}: STOPPED" in err
    proc = tti("jobs", "status", job_id, "--address", api_env.address, env=api_env.env)
    assert proc.returncode == 0 and proc.stdout.startswith(f"{job_id}: STOPPED"), (proc.stdout, proc.stderr)
    assert jobs.stop(job_id, api_env.address) is False  # already ended


def test_unreachable_address_is_one_line_and_quick(tmp_path):
    env = dict(os.environ)
    t0 = time.monotonic()
    proc = tti("submit", "configs/smoke.yaml", "--address", "http://127.0.0.1:1", env=env)
    elapsed = time.monotonic() - t0
    line = _one_line_error(proc)
    assert "--address: nothing answers at http://127.0.0.1:1 (connection refused)" in line
    assert "ray start --head" in line and "8265" in line
    assert elapsed < 60, elapsed  # interpreter + config checks; no network wait

    proc = tti("jobs", "status", "tti-x", "--address", "127.0.0.1:1", env=env)  # host:port gets http://
    assert "nothing answers at http://127.0.0.1:1" in _one_line_error(proc)


def test_silent_address_times_out():
    from tti_dist.errors import ConfigError
    from tti_dist.orchestrate.jobs import PROBE_TIMEOUT_S, connect

    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=rf"^--address: nothing answers at http://127.0.0.1:{port} "
                                              rf"\(no answer within 3 s\)"):
            connect(f"127.0.0.1:{port}")
        assert time.monotonic() - t0 < PROBE_TIMEOUT_S + 5


def test_ray_client_address_is_refused():
    proc = tti("submit", "configs/smoke.yaml", "--address", "ray://127.0.0.1:10001", env=dict(os.environ))
    line = _one_line_error(proc)
    assert "--address: 'ray://127.0.0.1:10001'" in line and "dashboard (Jobs API) address" in line


def test_file_outside_working_dir(tmp_path):
    outside = tmp_path / "tiny.yaml"
    outside.write_text(yaml.safe_dump(TINY))
    wd = tmp_path / "wd"
    wd.mkdir()
    proc = tti("submit", str(outside), "--address", "http://127.0.0.1:1", "--working-dir", str(wd),
               env=dict(os.environ))
    line = _one_line_error(proc)
    assert f"CONFIG: '{outside}' is outside the working directory '{wd.resolve()}'" in line
    assert "--working-dir" in line


def test_invalid_config_fails_before_contacting_the_cluster(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    # Port 1 answers nothing: reaching the config error proves no contact was needed.
    proc = tti("submit", str(cfg), "--address", "http://127.0.0.1:1", "--set", "model.num_heads=3",
               env=dict(os.environ), cwd=tmp_path)
    assert "model." in _one_line_error(proc)


def test_unknown_job_id(api_env):
    from tti_dist.errors import ConfigError
    from tti_dist.orchestrate import jobs

    expected = "JOB: no job 'tti-no-such-job' on the cluster at " + api_env.address
    proc = tti("jobs", "status", "tti-no-such-job", "--address", api_env.address, env=api_env.env)
    assert expected in _one_line_error(proc)
    for call in (jobs.logs, jobs.stop, lambda job, addr: jobs.logs(job, addr, follow=True)):
        with pytest.raises(ConfigError) as err:
            call("tti-no-such-job", api_env.address)
        assert str(err.value).startswith(expected)


def test_missing_token_is_one_line(head, tmp_path):
    env = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
    proc = tti("jobs", "status", "tti-x", "--address", head.address, env=env)
    line = _one_line_error(proc)
    assert "requires a Ray auth token (HTTP 401)" in line and "RAY_AUTH_TOKEN" in line

    (tmp_path / "wrong").write_text("0" * 64)
    proc = tti("jobs", "status", "tti-x", "--address", head.address, env=dict(env, RAY_AUTH_TOKEN_PATH=str(tmp_path / "wrong")))
    assert "refused the Ray auth token" in _one_line_error(proc)


def test_sweep_file_and_runtime_env_are_checked_locally(tmp_path):
    from tti_dist.errors import ConfigError
    from tti_dist.orchestrate.jobs import prepare_submission

    wd = tmp_path / "wd"
    (wd / "sweeps_cfg").mkdir(parents=True)
    (wd / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    sweep = wd / "sweeps_cfg" / "grid.yaml"
    sweep.write_text(yaml.safe_dump({"base": "../tiny.yaml", "axes": {"train.seed": [1, 2]}}))
    extra = tmp_path / "env.yaml"
    extra.write_text(yaml.safe_dump({"excludes": ["/data"], "env_vars": {"PYTHONUNBUFFERED": 1}}))

    plan = prepare_submission(sweep, overrides=["train.steps=3"], working_dir=wd, runtime_env=extra,
                              stamp="20260101-000000")
    assert plan.kind == "sweep" and plan.submission_id == "tti-grid-20260101-000000"
    assert plan.entrypoint == ("python -m tti_dist.cli sweep sweeps_cfg/grid.yaml --address auto "
                               "--out sweeps/grid-20260101-000000 --set train.steps=3")
    assert plan.runtime_env["working_dir"] == str(wd.resolve())
    assert plan.runtime_env["excludes"][-1] == "/data" and "/.venv" in plan.runtime_env["excludes"]
    assert plan.runtime_env["env_vars"] == {"PYTHONUNBUFFERED": "1"}

    with pytest.raises(ConfigError, match=r"model\.num_heads: 3"):  # every trial is validated
        prepare_submission(sweep, overrides=["model.num_heads=3"], working_dir=wd)
    with pytest.raises(ConfigError, match=r"^base: '\.\./tiny\.yaml' .* is outside the working directory"):
        prepare_submission(sweep, working_dir=wd / "sweeps_cfg")
    extra.write_text(yaml.safe_dump({"working_dir": "."}))
    with pytest.raises(ConfigError, match=r"^--runtime-env: sets working_dir"):
        prepare_submission(sweep, working_dir=wd, runtime_env=extra)


def test_submitted_run_succeeds(submitted_run, head):
    """Last in the module: by now the job has had the other tests' time to train."""
    job_id, out = submitted_run["job_id"], submitted_run["out"]
    deadline = submitted_run["submitted_at"] + SUCCESS_DEADLINE_S
    while True:
        proc = tti("jobs", "status", job_id, "--address", head.address, env=head.env)
        assert proc.returncode == 0, proc.stderr
        state = proc.stdout.split(":", 1)[1].split()[0]
        if state in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            break
        time.sleep(3)
    logs = tti("jobs", "logs", job_id, "--address", head.address, env=head.env)
    assert logs.returncode == 0, logs.stderr
    assert state == "SUCCEEDED", f"{proc.stdout}\n{logs.stdout[-4000:]}"
    assert "tti_dist.cli sweep tiny.yaml" in logs.stdout

    # The output landed where --out said: the one trial of the run config, with --set applied.
    (config_file,) = out.glob("runs/*/config.yaml")
    run_cfg = yaml.safe_load(config_file.read_text())
    assert run_cfg["train"]["steps"] == STEPS and run_cfg["train"]["micro_batch_size"] == 2
    assert (config_file.parent / "eval" / f"{STEPS}.parquet").is_file()
    trial = json.loads((config_file.parent / "trial.json").read_text())
    assert trial["status"] == "completed", trial
    assert trial["tokens"] == STEPS * 2 * 32  # steps x micro-batch x seq_len
