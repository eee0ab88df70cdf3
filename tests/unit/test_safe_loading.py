"""Files tti reads run no code from them: weights-only loads with an exact allowlist, and
tti's own RNG and SAE files in formats that are not pickles (tti_dist.utils.safe_load).

Every crafted file carries a pickle payload that would create a marker file when unpickled
with `weights_only=False`; each test checks the one-line refusal and that the marker was
never created. The same refusals through every `tti` command are in
tests/integration/test_safe_loading_cli.py.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shlex
from pathlib import Path, PosixPath

import numpy as np
import pytest
import torch

from tti_dist.errors import ConfigError, RefusedFileError
from tti_dist.rundir import rng_file_name
from tti_dist.train import checkpoint as ckpt
from tti_dist.utils.safe_load import (
    DEEPSPEED_GLOBALS,
    LEGACY_RNG_GLOBALS,
    exact_allowlist,
    load_torch_file,
    weights_only_loads,
)

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Pickles to a call of os.system that touches `marker` (what a hostile file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def save_payload(path: Path, marker: Path, **kwargs) -> Path:
    """A torch.save file at `path` that looks like a state dict and runs the payload on unpickling."""
    torch.save({"module": {"w": torch.zeros(2)}, "x": Payload(marker)}, path, **kwargs)
    return path


def assert_refused_once(exc: pytest.ExceptionInfo, path: Path, reason: str) -> None:
    """One line, naming the file and the reason, raised as the CLI's user-error class."""
    message = str(exc.value)
    assert isinstance(exc.value, ConfigError)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    assert reason in message, message


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "MARKER"
    yield m
    assert not m.exists(), "the pickle payload ran"


def test_payload_is_live(tmp_path):
    """The crafted file does run its payload under a plain unpickle (so the refusals below mean something)."""
    m = tmp_path / "MARKER"
    f = save_payload(tmp_path / "x.pt", m)
    torch.load(f, weights_only=False)  # the unsafe load tti never does
    assert m.exists()


def test_load_torch_file_refuses_a_payload(tmp_path, marker):
    f = save_payload(tmp_path / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(RefusedFileError) as exc:
        load_torch_file(f, DEEPSPEED_GLOBALS)
    assert_refused_once(exc, f, "refused to unpickle posix.system (not in tti's allowlist)")


def test_load_torch_file_refuses_a_protocol4_payload(tmp_path, marker):
    """Globals pushed with STACK_GLOBAL (pickle protocol 4) are refused as well."""
    f = save_payload(tmp_path / "mp_rank_00_model_states.pt", marker, pickle_protocol=4)
    with pytest.raises(RefusedFileError) as exc:
        load_torch_file(f, DEEPSPEED_GLOBALS)
    assert_refused_once(exc, f, "")


def test_load_torch_file_refuses_a_plain_pickle_and_other_files(tmp_path, marker):
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps(Payload(marker)))
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    for f in (plain, text):
        with pytest.raises(RefusedFileError) as exc:
            load_torch_file(f)
        assert_refused_once(exc, f, "not a torch.save file tti can read")


def test_allowlist_is_exact(tmp_path):
    """A class another library registered process-wide (megatron-core registers PosixPath) is
    refused, and that registration is back afterwards."""
    f = tmp_path / "p.pt"
    torch.save({"path": PosixPath("/tmp")}, f)
    registered = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([PosixPath])
    try:
        assert torch.load(f, weights_only=True) == {"path": PosixPath("/tmp")}
        with pytest.raises(RefusedFileError) as exc:
            load_torch_file(f)
        assert_refused_once(exc, f, "refused to unpickle pathlib.PosixPath")
        assert PosixPath in torch.serialization.get_safe_globals()
        assert load_torch_file(f, ["pathlib.PosixPath"]) == {"path": PosixPath("/tmp")}
        assert PosixPath in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(registered)


def test_deepspeed_classes_load_only_with_the_allowlist(tmp_path):
    """What DeepSpeed's optimizer files hold beyond tensors: the three allowlisted classes."""
    from tti_dist.utils.deepspeed_import import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    f = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.optimizer_states,
                                      "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
                                      "fp32": torch.arange(4.0)}}
    torch.save(state, f)
    loaded = load_torch_file(f, DEEPSPEED_GLOBALS)["optimizer_state_dict"]
    assert loaded["zero_stage"] is ZeroStageEnum.optimizer_states
    assert loaded["loss_scaler"].cur_scale == 1.0
    assert loaded["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=0)
    with pytest.raises(RefusedFileError) as exc:
        load_torch_file(f)
    assert_refused_once(exc, f, "refused to unpickle " + ", ".join(sorted(DEEPSPEED_GLOBALS)))


def test_weights_only_loads_overrides_an_explicit_weights_only_false(tmp_path, marker):
    """What makes DeepSpeed's zero_to_fp32 (which passes weights_only=False) safe."""
    f = save_payload(tmp_path / "x.pt", marker)
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with weights_only_loads(DEEPSPEED_GLOBALS), pytest.raises(pickle.UnpicklingError):
        torch.load(f, weights_only=False)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before


def test_zero_to_fp32_path_refuses_a_payload(tmp_path, marker):
    """tti's ZeRO 1-3 consolidation goes through DeepSpeed's zero_to_fp32: a payload in the
    files it reads is refused in one line naming the checkpoint."""
    from tti_dist.train.export import tp_rank_state_dict

    tag_dir = tmp_path / "checkpoints" / "global_step2"
    tag_dir.mkdir(parents=True)
    save_payload(tag_dir / "mp_rank_00_model_states.pt", marker)
    save_payload(tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(RefusedFileError) as exc:
        tp_rank_state_dict(tag_dir.parent, "global_step2", 0, zero_stage=1)
    assert_refused_once(exc, tag_dir, "refused to unpickle posix.system (not in tti's allowlist)")


def test_checkpoint_check_covers_optimizer_and_expert_files(tmp_path, marker):
    """resolve_checkpoint loads every DeepSpeed state file before any rank starts."""
    from tti_dist.rundir import check_checkpoint_files

    tag_dir = tmp_path / "global_step2"
    tag_dir.mkdir()
    torch.save({"module": {"w": torch.zeros(2)}}, tag_dir / "mp_rank_00_model_states.pt")
    check_checkpoint_files(tag_dir)
    for name in ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "layer_0_expert_3_mp_rank_00_model_states.pt"):
        f = save_payload(tag_dir / name, marker)
        with pytest.raises(RefusedFileError) as exc:
            check_checkpoint_files(tag_dir)
        assert_refused_once(exc, f, "refused to unpickle posix.system")
        f.unlink()


def _draws() -> list:
    return [torch.rand(3).tolist(), np.random.rand(2).tolist(), np.random.standard_normal(), random.random(),
            random.gauss(0, 1)]


def test_rng_state_is_json_and_restores_every_generator(tmp_path):
    # Leave a cached gaussian in numpy and in python: part of the state.
    np.random.standard_normal()
    random.gauss(0, 1)
    path = tmp_path / rng_file_name(3)
    ckpt.write_rng_state(path)
    data = json.loads(path.read_text())
    assert data["format"] == ckpt.RNG_FORMAT
    assert data["numpy"]["has_gauss"] == 1 and data["python"]["gauss_next"] is not None
    expected = _draws()
    ckpt.restore_rng_state(ckpt.read_rng_state(tmp_path, 3))
    assert _draws() == expected


def test_rng_state_of_an_older_version_loads(tmp_path):
    """rng_rank<R>.pt (torch.save of capture_rng_state, as older versions wrote it) still resumes."""
    torch.save(ckpt.capture_rng_state(), tmp_path / "rng_rank00001.pt")
    expected = _draws()
    ckpt.restore_rng_state(ckpt.read_rng_state(tmp_path, 1))
    assert _draws() == expected
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "rng_rank00001.pt"))) <= set(
        LEGACY_RNG_GLOBALS)


def test_rng_state_refusals(tmp_path, marker):
    # A pickle in the place of the JSON file.
    json_file = save_payload(tmp_path / rng_file_name(0), marker)
    with pytest.raises(RefusedFileError) as exc:
        ckpt.read_rng_state(tmp_path, 0)
    assert_refused_once(exc, json_file, "not an RNG state file written by tti")
    # A pickle in the place of an older version's file.
    legacy = save_payload(tmp_path / "rng_rank00001.pt", marker)
    with pytest.raises(RefusedFileError) as exc:
        ckpt.read_rng_state(tmp_path, 1)
    assert_refused_once(exc, legacy, "refused to unpickle posix.system")
    # JSON of the wrong shape, and no file at all.
    good = tmp_path / rng_file_name(2)
    ckpt.write_rng_state(good)
    data = json.loads(good.read_text())
    data["python"]["state"] = data["python"]["state"][:-1]
    good.write_text(json.dumps(data))
    with pytest.raises(RefusedFileError) as exc:
        ckpt.read_rng_state(tmp_path, 2)
    assert_refused_once(exc, good, "python state has 624 entries, not 625")
    with pytest.raises(RefusedFileError) as exc:
        ckpt.read_rng_state(tmp_path, 4)
    assert_refused_once(exc, tmp_path / rng_file_name(4), "missing")


def _sae_meta() -> dict:
    return {"sae_config": {"num_latents": 8, "k": 2}, "d_model": 4, "tp_rank": 0, "tp_size": 1, "seed": 7}


def _sae_state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"W_enc": torch.randn(8, 4, generator=g), "b_enc": torch.randn(8, generator=g),
            "W_dec": torch.randn(4, 8, generator=g), "b_pre": torch.randn(4, generator=g)}


def test_sae_shard_is_safetensors_and_round_trips(tmp_path):
    from safetensors import safe_open

    from tti_dist.sae import files

    path = tmp_path / files.shard_name(0)
    files.write_shard(path, _sae_state(), _sae_meta())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == files.FORMAT
    assert files.read_meta(path) == _sae_meta()
    meta, state = files.read_shard(path)
    assert meta == _sae_meta()
    assert state.keys() == _sae_state().keys()
    for k, v in _sae_state().items():
        assert torch.equal(state[k], v), k
    assert files.shard_files(tmp_path) == [path]


def test_sae_shard_of_an_older_version_loads(tmp_path):
    """sae_tp_rank<R>.pt (torch.save, as older versions wrote it) loads with the weights-only unpickler."""
    from tti_dist.sae import files

    old = tmp_path / "sae_tp_rank00.pt"
    torch.save({"sae": _sae_state(), **_sae_meta()}, old)
    assert files.shard_files(tmp_path) == [old]
    meta, state = files.read_shard(old)
    assert meta == _sae_meta() and torch.equal(state["W_dec"], _sae_state()["W_dec"])


def test_sae_shard_refusals(tmp_path, marker):
    from safetensors.torch import save_file

    from tti_dist.sae import files

    fake = save_payload(tmp_path / files.shard_name(0), marker)  # a pickle named .safetensors
    with pytest.raises(RefusedFileError) as exc:
        files.read_meta(fake)
    assert_refused_once(exc, fake, "not a safetensors SAE shard")
    other = tmp_path / files.shard_name(1)
    save_file(_sae_state(), str(other))  # safetensors, but not written by tti sae fit
    with pytest.raises(RefusedFileError) as exc:
        files.read_shard(other)
    assert_refused_once(exc, other, "no tti_dist.sae metadata")
    legacy = save_payload(tmp_path / "sae_tp_rank00.pt", marker)
    with pytest.raises(RefusedFileError) as exc:
        files.read_shard(legacy)
    assert_refused_once(exc, legacy, "refused to unpickle posix.system")


def _unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, call) of every call in `source` that can unpickle arbitrary objects: torch.load
    without weights_only=True, pickle/dill/joblib loads, np.load(allow_pickle=True)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        kw = {k.arg: k.value for k in node.keywords}
        is_true = lambda v: isinstance(v, ast.Constant) and v.value is True  # noqa: E731
        name = f"{owner}.{node.func.attr}"
        if (name == "torch.load" and not is_true(kw.get("weights_only"))) \
                or (owner in ("pickle", "dill", "joblib", "cloudpickle") and node.func.attr in ("load", "loads")) \
                or (name in ("np.load", "numpy.load") and is_true(kw.get("allow_pickle"))):
            found.append((node.lineno, name))
    return found


def test_no_unsafe_loads_in_tti():
    """Nothing in the package unpickles except through torch's weights-only unpickler."""
    assert _unsafe_calls("torch.load(f, weights_only=False)\ntorch.load(f)\npickle.loads(b)\n"
                         "np.load(f, allow_pickle=True)\ntorch.load(f, weights_only=True)") == [
        (1, "torch.load"), (2, "torch.load"), (3, "pickle.loads"), (4, "np.load")]
    hits = {str(f.relative_to(REPO)): calls for f in sorted((REPO / "tti_dist").rglob("*.py"))
            if (calls := _unsafe_calls(f.read_text()))}
    assert hits == {}
