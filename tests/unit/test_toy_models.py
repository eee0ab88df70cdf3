"""Tests of Toy Models of Superposition (tti_dist/toy/): metrics on known geometries (exact, in
float64), config validation, the batched model, a short training run that must reproduce the
paper's qualitative result, and `tti toy` end to end through a subprocess."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tti_dist.config.reference import field_docs
from tti_dist.errors import ConfigError
from tti_dist.toy import metrics as M
from tti_dist.toy import penalties
from tti_dist.toy.config import ToyConfig, load_toy_config
from tti_dist.toy.model import ToyModel, lr_factor, reconstruction_loss, train_toy

REPO = Path(__file__).resolve().parents[2]
TOY_CONFIG = REPO / "configs" / "toy_superposition.yaml"
EXACT = dict(rtol=0, atol=1e-12)


def _polygon(k: int) -> torch.Tensor:
    """k unit vectors at angles 2 pi j / k in the plane, as the columns of a [2, k] W."""
    angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    return torch.stack([angles.cos(), angles.sin()])


def _simplex(k: int) -> torch.Tensor:
    """k unit vectors forming a regular simplex in k - 1 dimensions (columns of [k - 1, k])."""
    centered = torch.eye(k, dtype=torch.float64) - 1.0 / k  # rows sum to 0: span a (k-1)-dim space
    basis = torch.linalg.svd(centered).Vh[: k - 1]  # [k-1, k] orthonormal rows of that space
    W = basis @ centered
    return W / W.norm(dim=0, keepdim=True)


# -- feature dimensionality of known geometries ------------------------------------------------------

def test_antipodal_pair_is_one_half():
    W = torch.tensor([[1.0, -1.0]], dtype=torch.float64)  # two features on one line, opposite
    torch.testing.assert_close(M.feature_dimensionality(W), torch.tensor([0.5, 0.5], dtype=torch.float64), **EXACT)
    W2 = torch.tensor([[0.6, -0.6, 0.0], [0.8, -0.8, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)  # pair + own axis
    torch.testing.assert_close(M.feature_dimensionality(W2), torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64),
                               **EXACT)


def test_pentagon_is_two_fifths():
    D = M.feature_dimensionality(_polygon(5))
    torch.testing.assert_close(D, torch.full((5,), 0.4, dtype=torch.float64), **EXACT)
    # Rotating the whole pentagon or scaling it changes nothing.
    c, s = math.cos(0.3), math.sin(0.3)
    R = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    torch.testing.assert_close(M.feature_dimensionality(3.0 * R @ _polygon(5)), D, **EXACT)


def test_orthogonal_features_are_one_and_zero_columns_zero():
    torch.testing.assert_close(M.feature_dimensionality(torch.eye(4, dtype=torch.float64)),
                               torch.ones(4, dtype=torch.float64), **EXACT)
    # Orthogonal columns of any length are dedicated dimensions; a zero column has D_i = 0.
    W = torch.tensor([[0.3, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(M.feature_dimensionality(W), torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64),
                               **EXACT)
    assert M.feature_dimensionality(torch.zeros(2, 3, dtype=torch.float64)).eq(0).all()


@pytest.mark.parametrize("k,expected", [(3, 2 / 3), (4, 3 / 4)])
def test_regular_simplex_is_k_minus_one_over_k(k, expected):
    D = M.feature_dimensionality(_simplex(k))  # triangle in 2D: 2/3; tetrahedron in 3D: 3/4
    torch.testing.assert_close(D, torch.full((k,), expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_unequal_antipodal_pair():
    # D_i = |W_i|^2 / (|W_i|^2 + |W_j|^2) for two features on one line.
    D = M.feature_dimensionality(torch.tensor([[2.0, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(D, torch.tensor([0.8, 0.2], dtype=torch.float64), **EXACT)


def test_batched_instances_match_single():
    pair_axes = torch.tensor([[1.0, -1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0, 0.0]], dtype=torch.float64)
    W = torch.stack([_polygon(5), pair_axes])
    D = M.feature_dimensionality(W)
    assert D.shape == (2, 5)
    torch.testing.assert_close(D[0], M.feature_dimensionality(_polygon(5)), **EXACT)
    torch.testing.assert_close(D[1], torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0], dtype=torch.float64), **EXACT)
    torch.testing.assert_close(M.represented_features(W), torch.tensor([5, 4]))
    torch.testing.assert_close(M.dimensions_per_feature(W), torch.tensor([0.4, 0.5], dtype=torch.float64), **EXACT)


# -- D*, represented features, superposition -----------------------------------------------------------

def test_dimensions_per_feature_closed_forms():
    f64 = dict(dtype=torch.float64)
    assert M.dimensions_per_feature(torch.eye(3, **f64)).item() == 1.0  # m orthogonal unit features
    assert M.dimensions_per_feature(torch.tensor([[1.0, -1.0]], **f64)).item() == 0.5  # m / ||W||_F^2 = 1/2
    torch.testing.assert_close(M.dimensions_per_feature(_polygon(5)), torch.tensor(0.4, **f64), **EXACT)
    torch.testing.assert_close(M.dimensions_per_feature(2.0 * _polygon(5)), torch.tensor(0.1, **f64), **EXACT)
    assert math.isinf(M.dimensions_per_feature(torch.zeros(2, 4, **f64)).item())


def test_represented_features_counts_norms_above_threshold():
    W = torch.tensor([[1.0, 0.0, 0.3, 0.0, 0.0], [0.0, 0.6, 0.3, 0.4, 0.0]], dtype=torch.float64)
    # norms: 1, 0.6, 0.424, 0.4, 0
    assert M.represented_features(W).item() == 2
    assert M.represented_features(W, threshold=0.35).item() == 4
    assert M.represented_features(W, threshold=1.0).item() == 0
    assert M.represented_features(W.unsqueeze(0).repeat(3, 1, 1)).tolist() == [2, 2, 2]


def test_superposition_and_max_cosine():
    f64 = dict(dtype=torch.float64)
    torch.testing.assert_close(M.superposition(torch.eye(3, **f64)), torch.zeros(3, **f64), **EXACT)
    torch.testing.assert_close(M.superposition(torch.tensor([[1.0, -1.0]], **f64)), torch.ones(2, **f64), **EXACT)
    # Pentagon: sum_j cos^2 = 5/2, minus the feature itself.
    torch.testing.assert_close(M.superposition(_polygon(5)), torch.full((5,), 1.5, **f64), **EXACT)
    assert M.max_abs_cosine(torch.eye(3, **f64)).item() == 0.0
    assert M.max_abs_cosine(torch.tensor([[1.0, -1.0, 0.0]], **f64)).item() == 1.0
    mask = torch.tensor([True, False, True])
    assert M.max_abs_cosine(torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]], **f64), mask).item() == 0.0


def test_fraction_helpers():
    assert [M.fraction_label(v) for v in (0.99, 0.74, 0.66, 0.52, 0.41, 0.37, 0.01)] == \
        ["1", "3/4", "2/3", "1/2", "2/5", "3/8", "0"]
    shares = M.fraction_shares(torch.tensor([1.0, 0.5, 0.5, 0.4, 0.3]), tolerance=0.02)
    assert shares["1"] == pytest.approx(0.2) and shares["1/2"] == pytest.approx(0.4)
    assert shares["2/5"] == pytest.approx(0.2) and shares["other"] == pytest.approx(0.2)
    assert M.fraction_shares(torch.tensor([])) == {}


# -- penalties and model ------------------------------------------------------------------------------

def test_penalties_closed_forms():
    f64 = dict(dtype=torch.float64)
    W = torch.stack([torch.eye(3, **f64)[:, :3], torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], **f64)])
    # Orthonormal columns: 0. Antipodal pair + orthogonal third: cos^2 = 1 for 2 ordered pairs of 6.
    torch.testing.assert_close(penalties.orthogonality(W), torch.tensor([0.0, 2 / 6], **f64), **EXACT)
    # Pentagon: 5 * 1.5 squared cosines over 5 * 4 ordered pairs.
    torch.testing.assert_close(penalties.orthogonality(_polygon(5).unsqueeze(0)), torch.tensor([7.5 / 20], **f64),
                               **EXACT)
    h = torch.tensor([[[1.0, -2.0], [0.0, 0.0]], [[3.0, 0.0], [0.5, -0.5]]], **f64)  # [B=2, I=2, m=2]
    torch.testing.assert_close(penalties.l1_hidden(h), torch.tensor([1.5, 0.25], **f64), **EXACT)


def test_model_forward_and_topk():
    torch.manual_seed(0)
    model = ToyModel(3, 6, 4, topk_hidden=2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        model.b.normal_()
    x = torch.rand(5, 3, 6, dtype=torch.float64)
    out, h = model(x)
    for i in range(3):
        W, b = model.W[i].detach(), model.b[i].detach()
        hi = x[:, i] @ W.T
        torch.testing.assert_close(h[:, i].detach(), hi)
        keep = hi.abs().topk(2, dim=-1).indices
        kept = torch.zeros_like(hi).scatter(-1, keep, hi.gather(-1, keep))
        torch.testing.assert_close(out[:, i].detach(), torch.relu(kept @ W + b))
    model.topk_hidden = 0
    out, _ = model(x)
    torch.testing.assert_close(out[:, 1].detach(), torch.relu(x[:, 1] @ model.W[1].T @ model.W[1] + model.b[1]).detach())
    imp = torch.tensor([1.0, 0.9, 0.81, 0.729, 0.6561, 0.59049], dtype=torch.float64)
    rec = reconstruction_loss(x, out, imp)
    torch.testing.assert_close(rec[2], (imp * (x[:, 2] - out[:, 2]) ** 2).mean())


def test_lr_schedules():
    assert lr_factor("constant", 7, 10) == 1.0
    assert lr_factor("linear", 0, 10) == 1.0 and lr_factor("linear", 5, 10) == 0.5
    assert lr_factor("cosine", 0, 10) == 1.0 and lr_factor("cosine", 5, 10) == pytest.approx(0.5)


def test_training_is_deterministic_and_leaves_threads():
    cfg = ToyConfig(num_features=6, num_hidden=2, sparsities=(0.0, 0.9), instances_per_sparsity=1, steps=20,
                    batch_size=32, eval_batch_size=64, log_every=0, l1_hidden=0.01, orthogonality=0.01).validate()
    threads = torch.get_num_threads()
    a, b = train_toy(cfg), train_toy(cfg)
    assert torch.get_num_threads() == threads
    assert torch.equal(a.W, b.W) and torch.equal(a.loss, b.loss)
    assert set(a.penalties) == {"l1_hidden", "orthogonality"}
    assert a.W.shape == (2, 2, 6) and a.sparsity == [0.0, 0.9] and a.repeat == [0, 0]
    c = train_toy(dataclasses.replace(cfg, seed=1))
    assert not torch.equal(a.W, c.W)


def test_training_reproduces_the_qualitative_result():
    """Dense features: about m features, orthogonal. Sparse features: more than m, in superposition.

    n = 10 features, m = 4 hidden, 2 repeats per sparsity. Checked over seeds 0..5 when written:
    at S = 0 every instance had exactly 4 represented features with max |cos| <= 0.001; at
    S = 0.99 all 10 features were represented with D_i = 2/5 (two pentagons).
    """
    cfg = ToyConfig(num_features=10, num_hidden=4, sparsities=(0.0, 0.99), instances_per_sparsity=2, steps=4000,
                    batch_size=256, lr=1e-2, seed=0, log_every=0).validate()
    result = train_toy(cfg)
    W = result.W.double()
    represented = M.feature_norms(W) > cfg.represented_threshold
    count = represented.sum(dim=-1)
    max_cos = M.max_abs_cosine(W, represented)
    D = M.feature_dimensionality(W)
    for i, s in enumerate(result.sparsity):
        if s == 0.0:
            assert count[i] <= cfg.num_hidden + 1, (i, count)
            assert max_cos[i] < 0.2, (i, max_cos)
        else:
            assert count[i] > cfg.num_hidden, (i, count)
            assert D[i][represented[i]].mean() < 1.0
            assert M.dimensions_per_feature(W[i]) < 1.0


# -- config -------------------------------------------------------------------------------------------

def test_every_config_field_is_documented():
    missing = {f.name for f in dataclasses.fields(ToyConfig)} - set(field_docs(ToyConfig))
    assert not missing


def test_shipped_config_is_the_default():
    cfg = load_toy_config(TOY_CONFIG)
    assert cfg == ToyConfig()
    assert cfg.num_instances == 24 and cfg.sparsities[0] == 0.0 and max(cfg.sparsities) < 1


@pytest.mark.parametrize("override,message", [
    ("sparsities=[0, 1.0]", "toy.sparsities[1]: 1.0 is not allowed; use a sparsity in [0, 1)"),
    ("sparsities=[-0.1]", "toy.sparsities[0]: -0.1 is not allowed"),
    ("sparsities=[]", "toy.sparsities: [] is not allowed"),
    ("num_hidden=20", "toy.num_hidden: 20 is not allowed; use 1..19"),
    ("topk_hidden=9", "toy.topk_hidden: 9 is not allowed; use 0 (off) or 1..num_hidden (8)"),
    ("l1_hidden=-1", "toy.l1_hidden: -1.0 is not allowed; use a finite coefficient >= 0"),
    ("orthogonality=-0.5", "toy.orthogonality: -0.5 is not allowed"),
    ("importance_decay=0", "toy.importance_decay: 0.0 is not allowed; use a number in (0, 1]"),
    ("num_hiden=3", "toy.num_hiden: unknown key; did you mean 'num_hidden'?"),
    ("steps=abc", "toy.steps: expected an integer, got 'abc'"),
    ("toy.steps=0", "toy.steps: 0 is not allowed; use an integer >= 1"),
    ("lr_schedule=step", "toy.lr_schedule: 'step' is not allowed; choose one of"),
    ("device=tpu", "toy.device: 'tpu' is not allowed"),
])
def test_config_errors_are_one_line_with_field(override, message):
    with pytest.raises(ConfigError) as info:
        load_toy_config(TOY_CONFIG, [override])
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="^config: '.*nope.yaml' does not exist"):
        load_toy_config(tmp_path / "nope.yaml")


# -- the command line ---------------------------------------------------------------------------------

def _tti(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tti_dist.cli", "toy", str(TOY_CONFIG), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_writes_outputs_and_rejects_bad_input(tmp_path):
    import pyarrow.parquet as pq

    run = tmp_path / "run"
    small = ["--set", "steps=30", "--set", "sparsities=[0, 0.9]", "--set", "batch_size=64",
             "--set", "eval_batch_size=128", "--set", "log_every=0"]
    bad = tmp_path / "bad"
    jobs = {"ok": _tti("--run-dir", str(run), *small),
            "bad": _tti("--run-dir", str(bad), "--set", "num_hiden=3")}
    results = {k: (p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for k, p in jobs.items()}

    code, out, err = results["bad"]
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tti: error: toy.num_hiden: unknown key; did you mean 'num_hidden'?")
    assert not bad.exists()  # nothing written on bad input

    code, out, err = results["ok"]
    assert code == 0, err
    assert "represented" in out and f"run directory: {run}" in out
    table = pq.read_table(run / "toy.parquet")
    for column in ("sparsity", "instance", "repeat", "feature", "importance", "norm", "D_i", "superposition",
                   "represented", "fraction", "D_star", "num_represented", "max_abs_cos", "loss", "w"):
        assert column in table.column_names, column
    assert table.num_rows == 2 * 2 * 20  # 2 sparsities x 2 repeats x 20 features
    assert len(table.column("w")[0].as_py()) == 8
    for figure in ("figures/wtw.png", "figures/dimensionality.png", "figures/dimensionality_clusters.png"):
        data = (run / figure).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    assert [g["sparsity"] for g in summary["by_sparsity"]] == [0.0, 0.9]
    assert load_toy_config(run / "config.yaml").steps == 30  # the resolved config reloads

    again = _tti("--run-dir", str(run), *small)
    code, out, err = again.wait(timeout=120), again.stdout.read(), again.stderr.read()
    assert code == 2
    assert [line for line in err.splitlines() if line.strip()] == [
        f"tti: error: --run-dir: '{run}' already holds toy.parquet; pass --overwrite to replace it "
        "or choose another directory"]
