"""TensorBoard for sweeps: hparams record, custom-scalars layout, server and `tti tensorboard`.

Two trial runs are written with real SummaryWriters into DIR/runs/{a,b}/tb (the layout of a
sweep's output directory), then read back both from the event files (EventAccumulator) and
through a real TensorBoard HTTP server: in-process via start_tensorboard, and through the
`tti tensorboard` command in a subprocess.
"""

from __future__ import annotations

import json
import math
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.custom_scalar import layout_pb2  # noqa: E402
from tensorboard.plugins.hparams import metadata as hp_metadata  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from tti_dist.report.tensorboard import sweep_layout, write_sweep_layout, write_trial_hparams  # noqa: E402
from tti_dist.report.tensorboard_server import resolve_logdir, start_tensorboard, stop_tensorboard  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
L0_TAG = "interp/blocks.0.mlp.act/l0"
STEPS = (0, 10, 20)
# Per trial: tag -> values at STEPS (eval/loss only at 10 and 20).
SERIES = {
    "a": {"train/task_loss": [5.0, 4.0, 3.5], "eval/loss": [None, 4.2, 3.75], L0_TAG: [30.0, 21.5, 12.25]},
    "b": {"train/task_loss": [5.0, 4.5, 4.25], "eval/loss": [None, 4.6, 4.375], L0_TAG: [30.0, 8.0, 2.5]},
}
HPARAMS = {
    "a": {"model_size": "s", "regularizers.0.coeff": 0.0, "train.seed": 1, "model.bias": True, "note": None},
    "b": {"model_size": "s", "regularizers.0.coeff": 0.003, "train.seed": 1, "model.bias": False, "note": None},
}
DEADLINE_S = 30.0


def _final(trial: str) -> dict[str, float]:
    return {tag: values[-1] for tag, values in SERIES[trial].items()}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A sweep output directory with two trial runs, each with hparams and the layout."""
    out = tmp_path_factory.mktemp("sweep")
    for trial, series in SERIES.items():
        tb_dir = out / "runs" / trial / "tb"
        with SummaryWriter(str(tb_dir)) as writer:
            for i, step in enumerate(STEPS):
                for tag, values in series.items():
                    if values[i] is not None:
                        writer.add_scalar(tag, values[i], global_step=step)
        metrics = {**_final(trial), "eval/ppl": math.inf}  # the inf one must be dropped
        write_trial_hparams(tb_dir, HPARAMS[trial], metrics, step=STEPS[-1])
        write_sweep_layout(tb_dir, [*series, "train/lr"])
    return out


def _accumulator(tb_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _assert_points(points: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    """Same steps, same values up to float32 rounding (event files store float32)."""
    assert [step for step, _ in points] == [step for step, _ in expected]
    assert [value for _, value in points] == pytest.approx([value for _, value in expected], rel=1e-6)


# ------------------------------------------------------------------------- event files


@pytest.mark.parametrize("trial", ["a", "b"])
def test_hparams_record_in_the_run(sweep_dir, trial, caplog):
    acc = _accumulator(sweep_dir / "runs" / trial / "tb")
    # The time series are untouched: no stray point at the hparams step.
    for tag, values in SERIES[trial].items():
        expected = [(s, v) for s, v in zip(STEPS, values) if v is not None]
        _assert_points(_scalars(acc, tag), expected)

    content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    assert set(content) == {hp_metadata.EXPERIMENT_TAG, hp_metadata.SESSION_START_INFO_TAG,
                            hp_metadata.SESSION_END_INFO_TAG}
    start = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
    hp = HPARAMS[trial]
    assert start.hparams["model_size"].string_value == "s"
    assert start.hparams["regularizers.0.coeff"].number_value == hp["regularizers.0.coeff"]
    assert start.hparams["train.seed"].number_value == 1
    assert start.hparams["model.bias"].string_value == ("true" if hp["model.bias"] else "false")
    assert start.hparams["note"].string_value == "none"

    experiment = hp_metadata.parse_experiment_plugin_data(content[hp_metadata.EXPERIMENT_TAG])
    metric_tags = sorted(m.name.tag for m in experiment.metric_infos)
    assert metric_tags == sorted(f"hparam/{tag}" for tag in SERIES[trial])  # eval/ppl (inf) dropped
    for tag, value in _final(trial).items():
        _assert_points(_scalars(acc, f"hparam/{tag}"), [(STEPS[-1], value)])
    assert "hparam/eval/ppl" not in acc.Tags()["scalars"]


def test_non_finite_metric_is_dropped_with_a_warning(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="tti_dist.report.tensorboard"):
        write_trial_hparams(tmp_path, {"x": 1}, {"eval/loss": 2.0, "eval/ppl": math.nan})
    assert any("eval/ppl=nan" in r.getMessage() for r in caplog.records)
    acc = _accumulator(tmp_path)
    assert _scalars(acc, "hparam/eval/loss") == [(0, 2.0)]
    assert acc.Tags()["scalars"] == ["hparam/eval/loss"]


def test_custom_scalars_layout_in_the_run(sweep_dir):
    acc = _accumulator(sweep_dir / "runs" / "a" / "tb")
    assert acc.PluginTagToContent("custom_scalars")  # the layout carries the plugin's name
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}
    assert charts == {
        "capability": {"eval/loss": [r"^eval/loss$"], "train/task_loss": [r"^train/task_loss$"]},
        "interpretability": {"interp/*/l0": [r"^interp/[^/]+/l0$"]},
    }
    # Each chart's regex matches its tag in every run (one line per trial), and nothing else.
    assert re.match(charts["interpretability"]["interp/*/l0"][0], "interp/blocks.7.attn.out/l0")
    assert not re.match(charts["interpretability"]["interp/*/l0"][0], "interp/blocks.0.mlp.act/l0_frac")
    assert not re.match(charts["capability"]["eval/loss"][0], "eval/loss_x")


def test_sweep_layout_groups_tag_families():
    tags = ["train/task_loss", "train/lr", "eval/loss", "eval/ppl", "eval/wiki/loss", "eval/wiki/ppl",
            "interp/blocks.0.mlp.act/l0", "interp/blocks.1.mlp.act/l0", "interp/blocks.1.mlp.act/dead_frac",
            "reg/l1/loss", "reg/ortho/loss", "sae/blocks.1.resid_post/ev", "moe/blocks.1/load_balance",
            "moe/aux_loss", "perf/tokens_per_sec", "perf/step_time_s"]
    layout = sweep_layout(tags)
    assert list(layout) == ["capability", "interpretability", "performance"]
    assert layout["capability"] == {
        "eval/*/loss": ["Multiline", [r"^eval/[^/]+/loss$"]],
        "eval/*/ppl": ["Multiline", [r"^eval/[^/]+/ppl$"]],
        "eval/loss": ["Multiline", [r"^eval/loss$"]],
        "eval/ppl": ["Multiline", [r"^eval/ppl$"]],
        "train/task_loss": ["Multiline", [r"^train/task_loss$"]],
    }
    assert layout["interpretability"] == {
        "interp/*/dead_frac": ["Multiline", [r"^interp/[^/]+/dead_frac$"]],
        "interp/*/l0": ["Multiline", [r"^interp/[^/]+/l0$"]],
        "moe/*/load_balance": ["Multiline", [r"^moe/[^/]+/load_balance$"]],
        "moe/aux_loss": ["Multiline", [r"^moe/aux_loss$"]],
        "reg/*/loss": ["Multiline", [r"^reg/[^/]+/loss$"]],
        "sae/*/ev": ["Multiline", [r"^sae/[^/]+/ev$"]],
    }
    assert layout["performance"] == {
        "perf/step_time_s": ["Multiline", [r"^perf/step_time_s$"]],
        "perf/tokens_per_sec": ["Multiline", [r"^perf/tokens_per_sec$"]],
    }
    assert sweep_layout(["train/lr"]) == {}


# ------------------------------------------------------------------------- server


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read().decode())


def _poll(url: str, ready) -> object:
    """GET url until ready(payload) (TensorBoard loads event files in the background)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            payload = _get_json(url)
            if ready(payload):
                return payload
        except OSError:
            payload = None  # not accepting connections yet
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}: not ready within {DEADLINE_S} s; last payload {payload!r}")
        time.sleep(0.1)


def _listen_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on `port`."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A = LISTEN
                addresses.add(address)
    return addresses


LOOPBACK_HEX = "0100007F"  # 127.0.0.1 in /proc/net/tcp byte order


def _check_served_values(base: str) -> None:
    assert sorted(_poll(base + "data/runs", lambda runs: len(runs) == 2)) == ["a/tb", "b/tb"]
    tags = _poll(base + "data/plugin/scalars/tags", lambda t: len(t) == 2)
    for run in ("a/tb", "b/tb"):
        assert {"train/task_loss", "eval/loss", L0_TAG, "hparam/eval/loss"} <= set(tags[run])
    for trial in ("a", "b"):
        for tag in ("eval/loss", L0_TAG):
            query = urllib.parse.urlencode({"run": f"{trial}/tb", "tag": tag})
            points = _poll(base + "data/plugin/scalars/scalars?" + query, bool)
            expected = [(s, v) for s, v in zip(STEPS, SERIES[trial][tag]) if v is not None]
            _assert_points([(step, value) for _, step, value in points], expected)


def test_start_tensorboard_serves_the_sweep_on_loopback(sweep_dir):
    logdir = resolve_logdir(sweep_dir)
    assert logdir == sweep_dir / "runs"  # a sweep directory serves its runs/
    assert resolve_logdir(sweep_dir / "runs" / "a") == sweep_dir / "runs" / "a"  # anything else as is
    url = start_tensorboard(logdir, port=0, reload_interval=0)
    try:
        parsed = urllib.parse.urlparse(url)
        assert parsed.hostname == "127.0.0.1" and parsed.port > 0
        if Path("/proc/net/tcp").exists():
            assert _listen_addresses(parsed.port) == {LOOPBACK_HEX}
        _check_served_values(url)

        # The hparams dashboard: one session per trial with its hparams and final metrics.
        request = urllib.request.Request(
            url + "data/plugin/hparams/session_groups",
            data=json.dumps({"experimentName": "", "startIndex": 0, "sliceSize": 10,
                             "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"], "colParams": []}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            groups = {g["name"]: g for g in json.loads(response.read().decode())["sessionGroups"]}
        assert set(groups) == {"a/tb", "b/tb"}
        for trial in ("a", "b"):
            group = groups[f"{trial}/tb"]
            assert group["hparams"]["regularizers.0.coeff"] == HPARAMS[trial]["regularizers.0.coeff"]
            values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
            assert values["hparam/eval/loss"] == pytest.approx(SERIES[trial]["eval/loss"][-1])

        layout = _get_json(url + "data/plugin/custom_scalars/layout")
        assert [c["title"] for c in layout["category"]] == ["capability", "interpretability"]
    finally:
        stop_tensorboard(url)
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "data/runs", timeout=2)
    # Nothing keeps running: the server thread ended, and reload_interval=0 loads only once.
    deadline = time.monotonic() + DEADLINE_S
    while any(t.name in ("TensorBoard", "Reloader") for t in threading.enumerate()):
        assert time.monotonic() < deadline, [t.name for t in threading.enumerate()]
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tti_tensorboard_command_serves_the_sweep(sweep_dir):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tti_dist.cli", "tensorboard", str(sweep_dir), "--port", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The URL line is printed once the server accepts connections.
        readable, _, _ = select.select([proc.stdout], [], [], DEADLINE_S)
        line = proc.stdout.readline() if readable else ""
        if not line:
            proc.kill()
            raise AssertionError(f"tti tensorboard printed no URL; stderr: {proc.communicate()[1]}")
        assert line.strip() == f"TensorBoard serving {sweep_dir / 'runs'} at http://127.0.0.1:{port}/ (Ctrl-C to stop)"
        if Path("/proc/net/tcp").exists():
            assert _listen_addresses(port) == {LOOPBACK_HEX}
        _check_served_values(f"http://127.0.0.1:{port}/")
        # Ctrl-C stops the server and the command exits cleanly.
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=DEADLINE_S)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize("case", ["missing", "no_events"])
def test_tti_tensorboard_user_errors(tmp_path, case):
    target = tmp_path / "nothing-here"
    if case == "no_events":
        (tmp_path / "sweep" / "runs" / "a" / "tb").mkdir(parents=True)
        target = tmp_path / "sweep"
    result = subprocess.run([sys.executable, "-m", "tti_dist.cli", "tensorboard", str(target)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    named = target if case == "missing" else target / "runs"
    assert lines[0].startswith("tti: error: DIR: ") and f"'{named}'" in lines[0]
