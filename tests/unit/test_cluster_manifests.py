"""The cluster deployment files (cluster/, configs/sweeps/scaling.yaml) are valid for the
tools that read them, and agree with each other and with the pinned versions.

Nothing is started: the Ray cluster config goes through Ray's own schema validation, the
KubeRay manifests and the runtime_env are parsed and cross-checked, and every trial of the
scaling sweep is built and validated as a run config.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SWEEP = ROOT / "configs" / "sweeps" / "scaling.yaml"
SHARED = "/mnt/shared"


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _load_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _pinned_ray_version() -> str:
    """The version in pyproject.toml's `ray` extra (ray[...]~=X.Y.Z: the image's Ray is X.Y.Z)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [re.fullmatch(r"ray(\[[^\]]*\])?(?:==|~=)([0-9.]+)", dep.replace(" ", ""))
            for dep in meta["project"]["optional-dependencies"]["ray"]]
    versions = [m.group(2) for m in pins if m]
    assert len(versions) == 1, f"expected one ray~=X.Y.Z pin in pyproject.toml, got {versions}"
    return versions[0]


def _setup_sh_versions() -> dict[str, str]:
    """Versions pinned by launch/setup.sh (the reference install order)."""
    text = (ROOT / "launch" / "setup.sh").read_text()
    out = {}
    for name, pattern in [("torch", r'TORCH_VERSION="([0-9.]+)"'),
                          ("megatron-core", r'MEGATRON_VERSION="([0-9.]+)"'),
                          ("deepspeed", r'DEEPSPEED_VERSION="([0-9.]+)"'),
                          ("ray", r'RAY_VERSION="([0-9.]+)"')]:
        m = re.search(pattern, text)
        assert m, f"launch/setup.sh: no {name} version found"
        out[name] = m.group(1)
    return out


def _ray_image() -> str:
    return f"rayproject/ray:{_pinned_ray_version()}-py311-gpu"


def _assert_install_order(commands: list[str], where: str) -> None:
    """torch, then megatron-core, then deepspeed without build isolation, then the package,
    each at the version launch/setup.sh pins."""
    versions = _setup_sh_versions()

    def index(pattern: str) -> int:
        hits = [i for i, c in enumerate(commands) if re.search(pattern, c)]
        assert hits, f"{where}: no command matches {pattern!r} in {commands}"
        return hits[0]

    i_torch = index(rf"pip install\b.*\btorch=={re.escape(versions['torch'])}\b")
    i_megatron = index(rf"pip install\b.*megatron-core=={re.escape(versions['megatron-core'])}\b")
    i_deepspeed = index(rf"pip install\b.*--no-build-isolation\b.*deepspeed=={re.escape(versions['deepspeed'])}\b")
    i_package = index(r"pip install\b.*(\s\.$|\s-e\s+\S*tti_dist\b|\s\.\s)")
    assert i_torch < i_megatron < i_deepspeed < i_package, (
        f"{where}: install order must be torch < megatron-core < deepspeed < package, got "
        f"{[i_torch, i_megatron, i_deepspeed, i_package]}")


def test_pinned_versions_agree():
    assert _pinned_ray_version() == _setup_sh_versions()["ray"]


# ---------------------------------------------------------------------------------------
# ray up


def test_ray_up_passes_ray_schema_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(CLUSTER / "ray-up.yaml")
    validate_config(copy.deepcopy(raw))
    # What `ray up` validates: the config merged with the provider's defaults.
    validate_config(prepare_config(copy.deepcopy(raw)))

    # The validator is live: the same file with a non-integer GPU count is refused.
    import jsonschema

    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_8x"]["resources"]["GPU"] = "8"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_ray_up_node_types_image_and_commands():
    cfg = _load(CLUSTER / "ray-up.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head node must not offer GPUs to trials"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers, "no worker node type"
    for name, node in workers.items():
        assert node["resources"].get("GPU", 0) == 8, f"{name}: expected 8 GPUs per worker node"
        assert node["resources"].get("CPU", 0) >= 8 * 8, f"{name}: too few CPUs for 8 workers x 8 CPUs"
        assert node.get("min_workers", 0) < node["max_workers"] <= cfg["max_workers"], f"{name}: does not autoscale"

    assert cfg["docker"]["image"] == _ray_image()
    assert "-v /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"]
    assert "." in cfg["file_mounts"].values(), "the repository is not synced to the nodes"
    assert any("/mnt/shared" in c and "mount" in c for c in cfg["initialization_commands"])

    _assert_install_order(cfg["setup_commands"], "ray-up.yaml setup_commands")

    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--dashboard-host=0.0.0.0" in head_start and "--dashboard-port=8265" in head_start
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in worker_start
    for where, cmds in [("head", head_start), ("worker", worker_start)]:
        assert "RAY_AUTH_MODE=token ray start" in cmds, f"{where}: Ray not started with token auth"
        assert "/mnt/shared/.ray/auth_token" in cmds, f"{where}: token not shared through /mnt/shared"

    # The dashboard port is opened to a CIDR range, never to the internet.
    rules = cfg["provider"]["security_group"]["IpPermissions"]
    dash = [r for r in rules if r["FromPort"] <= 8265 <= r["ToPort"]]
    assert dash, "no security-group rule for the dashboard port"
    assert all(ip["CidrIp"] != "0.0.0.0/0" for r in dash for ip in r["IpRanges"])


# ---------------------------------------------------------------------------------------
# KubeRay


def _raycluster() -> dict:
    docs = _load_all(KUBERAY / "raycluster.yaml")
    assert len(docs) == 1
    return docs[0]


def _rayjob() -> dict:
    docs = _load_all(KUBERAY / "rayjob.yaml")
    assert len(docs) == 1
    return docs[0]


def _pvc() -> dict:
    docs = _load_all(KUBERAY / "shared-pvc.yaml")
    assert len(docs) == 1
    return docs[0]


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == _pinned_ray_version(), f"{where}: rayVersion"
    assert spec["authOptions"]["mode"] == "token", f"{where}: token authentication off"
    pvc = _pvc()
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "shared storage must be ReadWriteMany"

    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    assert len(groups) >= 2, f"{where}: no worker group"
    for name, group in groups:
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            assert container["image"] == spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"], \
                f"{where}/{name}: all Ray pods must run the same image"
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert SHARED in mounts, f"{where}/{name}: {SHARED} not mounted"
            assert claims.get(mounts[SHARED]) == pvc["metadata"]["name"], \
                f"{where}/{name}: {SHARED} is not the shared PVC {pvc['metadata']['name']}"
            gpus = int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
            if name == "head":
                assert gpus == 0, f"{where}: the head pod must not hold GPUs"
            else:
                assert gpus == 8, f"{where}/{name}: expected nvidia.com/gpu limit 8, got {gpus}"
                assert group["minReplicas"] <= group["maxReplicas"] and group["maxReplicas"] >= 1


def test_raycluster_manifest():
    rc = _raycluster()
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["kind"] == "RayCluster"
    _check_cluster_spec(rc["spec"], "raycluster.yaml")


def test_rayjob_manifest():
    from ray.runtime_env import RuntimeEnv

    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    assert spec["rayClusterSpec"] == _raycluster()["spec"], "rayjob.yaml and raycluster.yaml cluster specs differ"

    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "tti_dist.cli", "sweep"], argv
    sweep_file = argv[4]
    assert (ROOT / sweep_file).is_file(), f"entrypoint runs {sweep_file}, which is not in the repository"
    assert (ROOT / sweep_file).resolve() == SWEEP, f"entrypoint runs {sweep_file}, not configs/sweeps/scaling.yaml"
    assert argv[argv.index("--address") + 1] == "auto"
    assert argv[argv.index("--out") + 1].startswith(SHARED + "/"), "sweep output must be on the shared volume"

    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) <= RuntimeEnv.known_fields
    # The working_dir is the repository copy in the image: the Dockerfile must put the sweep
    # file there. RuntimeEnv checks that a local working_dir exists, so it is given this
    # checkout, which the image copies.
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR\s+(\S+)", dockerfile, re.M).group(1)
    assert env["working_dir"] == workdir
    RuntimeEnv(**{**env, "working_dir": str(ROOT)})
    assert re.search(r"^COPY\b.*\bconfigs\b", dockerfile, re.M), "the image lacks configs/"
    assert env["env_vars"] == _load(CLUSTER / "runtime_env.yaml")["env_vars"]


# ---------------------------------------------------------------------------------------
# runtime_env, Dockerfile


def test_runtime_env_constructs_and_tti_submit_accepts_it(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    data = _load(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**data)
    assert set(data) <= RuntimeEnv.known_fields, set(data) - RuntimeEnv.known_fields
    assert not {"pip", "uv", "conda"} & set(data), "the image carries the dependencies"
    assert all(isinstance(v, str) for v in data["env_vars"].values())

    # As `tti submit --runtime-env` merges it over its defaults (working_dir = the repo).
    from tti_dist.orchestrate.jobs import DEFAULT_EXCLUDES, load_runtime_env, merge_runtime_env

    monkeypatch.chdir(ROOT)
    merged = merge_runtime_env({"working_dir": str(ROOT), "excludes": list(DEFAULT_EXCLUDES)},
                               load_runtime_env(CLUSTER / "runtime_env.yaml"))
    RuntimeEnv(**merged)
    assert set(DEFAULT_EXCLUDES) <= set(merged["excludes"])
    assert merged["env_vars"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_dockerfile_base_and_install_order():
    text = (CLUSTER / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms == [_ray_image()], froms
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["requires-python"] == ">=3.11" and "-py311-" in froms[0]
    runs = re.findall(r"^RUN\s+(.*?)(?<!\\)$", text, re.M | re.S)
    _assert_install_order([" ".join(r.split()) for r in runs], "Dockerfile")


# ---------------------------------------------------------------------------------------
# The sweep the RayJob runs


def test_scaling_sweep_file():
    from tti_dist.orchestrate.presets import MODEL_SIZE_AXIS, MODEL_SIZES

    sweep = _load(SWEEP)
    assert isinstance(sweep, dict) and {"base", "axes"} <= set(sweep)
    assert (SWEEP.parent / sweep["base"]).is_file(), f"base {sweep['base']} does not exist"
    axes = sweep["axes"]
    assert axes[MODEL_SIZE_AXIS] == ["s", "m", "l", "xl"]
    assert set(axes[MODEL_SIZE_AXIS]) <= set(MODEL_SIZES)
    assert axes["train.seed"] == [1, 2, 3]
    coeffs = axes["regularizers.0.coefficient"]
    assert 0.0 in coeffs and len(coeffs) >= 3, "a baseline (0) and several strengths"
    assert sweep["resources"] == {"cpus_per_worker": 8, "gpus_per_worker": 1}


def test_every_scaling_trial_is_valid_and_fits_one_gpu_node():
    """The sweep loader of `tti sweep` builds and validates every trial (`set`, then the
    model-size preset and the other axes); each trial's workers fit on one GPU node of
    cluster/ray-up.yaml and of the KubeRay worker group."""
    from tti_dist.orchestrate.presets import resolve_presets
    from tti_dist.orchestrate.sweep_config import load_sweep

    raw = _load(SWEEP)
    sweep = load_sweep(SWEEP, [])
    coeffs = raw["axes"]["regularizers.0.coefficient"]
    assert len(sweep.trials) == len(raw["axes"]["model_size"]) * len(coeffs) * len(raw["axes"]["train.seed"]) == 48
    assert (sweep.cpus_per_worker, sweep.gpus_per_worker) == (8, 1)
    assert sweep.max_failures >= 1, "trials must be restartable from their checkpoints"

    node = _load(CLUSTER / "ray-up.yaml")["available_node_types"]["gpu_8x"]["resources"]
    pod = _raycluster()["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    presets = resolve_presets(raw.get("presets"))
    for trial in sweep.trials:
        cfg = trial.cfg
        preset = presets[trial.model_size]
        assert (cfg.model.num_layers, cfg.model.hidden_size) == (preset["num_layers"], preset["hidden_size"])
        assert cfg.train.device == "auto"
        assert cfg.regularizers[0].type == "l1"
        assert cfg.regularizers[0].coefficient == trial.axes["regularizers.0.coefficient"]
        workers = cfg.parallel.world_size
        for where, gpus, cpus in [("ray-up gpu_8x", node["GPU"], node["CPU"]),
                                  ("kuberay gpu-8x", int(pod["nvidia.com/gpu"]), int(pod["cpu"]))]:
            assert workers * sweep.gpus_per_worker <= gpus, f"{trial.name}: {workers} GPUs > {where}'s {gpus}"
            assert workers * sweep.cpus_per_worker <= cpus, f"{trial.name}: CPUs exceed {where}'s {cpus}"
