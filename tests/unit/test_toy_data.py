"""Tests of the Toy Models of Superposition data (tti_dist/data/toy.py).

Activation frequencies are checked within 4 binomial standard errors, sqrt(p (1 - p) / n)
over the n entries drawn with probability p, on fixed-seed generators. Active values are
Uniform[0, 1): their mean is checked within 4 standard errors sqrt(1 / 12 / n_active).
"""

from __future__ import annotations

import math

import pytest
import torch

from tti_dist.data.toy import importance_weights, sparse_feature_batch
from tti_dist.errors import ConfigError

SIGMAS = 4.0


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_frequency(x: torch.Tensor, p: float) -> None:
    n = x.numel()
    freq = (x != 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(freq - p) <= SIGMAS * sigma + 1e-12, (freq, p, sigma)


def test_shapes():
    g = _gen()
    assert sparse_feature_batch(7, 5, 0.3, generator=g).shape == (7, 5)
    assert sparse_feature_batch(7, 5, 0.3, num_instances=4, generator=g).shape == (7, 4, 5)
    assert sparse_feature_batch(7, 5, torch.tensor(0.3), generator=g).shape == (7, 5)
    per_instance = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert sparse_feature_batch(7, 5, per_instance, generator=g).shape == (7, 4, 5)
    assert sparse_feature_batch(7, 5, per_instance, num_instances=4, generator=g).shape == (7, 4, 5)
    assert sparse_feature_batch(7, 5, torch.full((4, 5), 0.5), generator=g).shape == (7, 4, 5)
    x = sparse_feature_batch(3, 2, 0.5, generator=g, dtype=torch.float64)
    assert x.dtype == torch.float64
    assert sparse_feature_batch(3, 2, 0.5, generator=g).dtype == torch.float32


def test_scalar_frequency_values_and_zeros():
    x = sparse_feature_batch(20_000, 20, 0.1, generator=_gen(1))
    _check_frequency(x, 0.1)
    assert (x >= 0).all() and (x < 1).all()
    active = x[x != 0]
    # Inactive entries are exactly 0 (no tiny values): everything else is a Uniform[0, 1) draw.
    assert active.numel() > 30_000
    mean_se = math.sqrt(1 / 12 / active.numel())
    assert abs(active.double().mean().item() - 0.5) <= SIGMAS * mean_se
    assert abs((active < 0.25).double().mean().item() - 0.25) <= SIGMAS * math.sqrt(0.25 * 0.75 / active.numel())


def test_per_instance_frequency():
    probs = torch.tensor([0.0, 0.01, 0.05, 0.5, 0.9, 1.0])
    x = sparse_feature_batch(10_000, 16, probs, generator=_gen(2))
    for i, p in enumerate(probs.tolist()):
        _check_frequency(x[:, i], p)
    assert (x[:, 0] == 0).all()
    assert (x[:, -1] > 0).all()


def test_per_feature_frequency():
    probs = torch.linspace(0, 1, 12).reshape(3, 4)
    x = sparse_feature_batch(20_000, 4, probs, generator=_gen(3))
    for i in range(3):
        for f in range(4):
            _check_frequency(x[:, i, f], probs[i, f].item())


def test_probability_zero_and_one():
    assert (sparse_feature_batch(100, 50, 0.0, generator=_gen()) == 0).all()
    x = sparse_feature_batch(100, 50, 1.0, num_instances=2, generator=_gen())
    assert (x > 0).all() and (x < 1).all()
    assert (sparse_feature_batch(10, 5, 0, generator=_gen()) == 0).all()  # an int works too


def test_generator_reproducibility():
    a = sparse_feature_batch(64, 10, 0.2, num_instances=3, generator=_gen(5))
    b = sparse_feature_batch(64, 10, 0.2, num_instances=3, generator=_gen(5))
    c = sparse_feature_batch(64, 10, 0.2, num_instances=3, generator=_gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g = _gen(5)
    first, second = sparse_feature_batch(64, 10, 0.2, generator=g), sparse_feature_batch(64, 10, 0.2, generator=g)
    assert not torch.equal(first, second)  # the generator advances


def test_device_placement():
    x = sparse_feature_batch(4, 3, 0.5, device="cpu", generator=_gen())
    assert x.device.type == "cpu"
    assert sparse_feature_batch(4, 3, torch.tensor([0.5, 0.2])).device.type == "cpu"
    assert importance_weights(3, device="cpu").device.type == "cpu"
    # On a device without host memory ("meta") nothing may be copied back to the host: the
    # batch is created there, and a probability tensor there is used without reading values.
    meta = sparse_feature_batch(4, 3, 0.5, device="meta")
    assert meta.device.type == "meta" and meta.shape == (4, 3)
    meta_p = torch.empty(2, 3, device="meta")
    out = sparse_feature_batch(4, 3, meta_p)
    assert out.device.type == "meta" and out.shape == (4, 2, 3)


def test_importance_weights_exact():
    w = importance_weights(5)
    assert w.dtype == torch.float32
    assert torch.equal(w, torch.tensor([1.0, 0.9, 0.81, 0.9**3, 0.9**4], dtype=torch.float64).float())
    assert torch.equal(importance_weights(4, 0.5, dtype=torch.float64),
                       torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=torch.float64))
    assert torch.equal(importance_weights(3, 1.0), torch.ones(3))
    assert torch.equal(importance_weights(3, 0.0), torch.tensor([1.0, 0.0, 0.0]))
    assert importance_weights(100, 0.7, dtype=torch.float64)[-1].item() == 0.7**99


@pytest.mark.parametrize("kwargs,field", [
    ({"feature_probability": 1.5}, "toy.feature_probability: 1.5"),
    ({"feature_probability": -0.1}, "toy.feature_probability: -0.1"),
    ({"feature_probability": float("nan")}, "toy.feature_probability: nan"),
    ({"feature_probability": "0.1"}, "toy.feature_probability: '0.1'"),
    ({"feature_probability": torch.tensor([0.1, 1.2])}, "toy.feature_probability: 1.2"),
    ({"feature_probability": torch.tensor(2.0)}, "toy.feature_probability: 2.0"),
    ({"feature_probability": torch.zeros(3, 4)}, "toy.feature_probability: a tensor of shape [3, 4]"),
    ({"feature_probability": torch.zeros(3), "num_instances": 2}, "toy.feature_probability: a tensor of shape [3]"),
    ({"feature_probability": torch.zeros(3, 5, 1)}, "toy.feature_probability: a tensor with 3 dimensions"),
    ({"batch_size": 0}, "toy.batch_size: 0"),
    ({"num_features": 2.0}, "toy.num_features: 2.0"),
    ({"num_instances": 0}, "toy.num_instances: 0"),
])
def test_invalid_arguments(kwargs, field):
    args = {"batch_size": 2, "num_features": 5, "feature_probability": 0.5, **kwargs}
    with pytest.raises(ConfigError) as info:
        sparse_feature_batch(**args)
    assert str(info.value).startswith(field), str(info.value)


def test_invalid_importance():
    with pytest.raises(ConfigError, match=r"^toy\.decay: -0\.5"):
        importance_weights(3, -0.5)
    with pytest.raises(ConfigError, match=r"^toy\.decay: inf"):
        importance_weights(3, float("inf"))
    with pytest.raises(ConfigError, match=r"^toy\.num_features: 0"):
        importance_weights(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_generation_stays_on_device():
    g = torch.Generator(device="cuda").manual_seed(0)
    probs = torch.tensor([0.0, 0.1, 1.0], device="cuda")
    x = sparse_feature_batch(1000, 8, probs, generator=g)
    assert x.device.type == "cuda" and x.shape == (1000, 3, 8)
    assert (x[:, 0] == 0).all() and (x[:, 2] > 0).all()
    _check_frequency(x[:, 1], 0.1)
    a = sparse_feature_batch(16, 4, 0.5, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    b = sparse_feature_batch(16, 4, 0.5, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    assert torch.equal(a, b)
