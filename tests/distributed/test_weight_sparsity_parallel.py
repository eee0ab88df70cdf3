"""Weight-sparse training (Gao et al. 2025) under TP and ZeRO, on real gloo ranks.

(a) `abs_topk_masks` on TP=2 shards keeps exactly the TP=1 mask of the whole matrix, ties
    and min_per_neuron included, for column- and row-parallel matrices in one call.
(b) A real ZeRO-2 run through the launcher (TP=1 x DP=2; density 0.25 reached at step 4 of
    8, min_per_neuron 2): every logged weights/<matrix>/density equals the schedule's kept
    count exactly, and the checkpoint's fp32 master partitions (consolidated as tti export
    does) hold exactly floor(density x size) nonzeros per matrix, in the places the model's
    own weights hold them. ZeRO-1 with TP=2 and resume: tests/distributed/test_training.py.
"""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
import torch

from spawn import run_ranks
from test_training import BASE, dataset_path, _dataset  # noqa: F401  (the module's dataset fixture)
from tti_dist.config import load_config
from tti_dist.regularizers.validation import validate_run_config
from tti_dist.train.worker import launch_local

STEPS = 8
DENSITY = 0.25
SPARSITY = f"weight_sparsity={{density: {DENSITY}, anneal_fraction: 0.5, min_per_neuron: 2}}"


def _matrices(seed: int) -> list[tuple[torch.Tensor, str, int, int]]:
    """(whole matrix, parallel, k, min_per_neuron): integer-valued (many ties) and normal entries."""
    g = torch.Generator().manual_seed(seed)
    ties = torch.randint(-4, 5, (12, 10), generator=g).float()
    normal = torch.randn(10, 12, generator=g)
    return [(ties, "column", 37, 0), (ties, "row", 60, 3), (normal, "column", 29, 2), (normal, "row", 119, 0),
            (ties.t().contiguous(), "column", 120, 0)]


def _mask_rank(seed: int):
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.weight_sparsity import abs_topk_masks

    groups = init_parallel(2, torch.device("cpu"), 60)
    try:
        cases = _matrices(seed)
        shards = [w.chunk(2, dim=0 if par == "column" else 1)[groups.tp_rank] for w, par, _, _ in cases]
        out = []
        for (w, par, k, j), shard in zip(cases, shards):  # one call per min_per_neuron value
            out.append(abs_topk_masks([shard], [par], [k], min_per_neuron=j, tp_group=groups.tp_group, tp_size=2,
                                      tp_rank=groups.tp_rank)[0])
        batched = abs_topk_masks([s for s, c in zip(shards, cases) if c[3] == 0],
                                 [c[1] for c in cases if c[3] == 0], [c[2] for c in cases if c[3] == 0],
                                 tp_group=groups.tp_group, tp_size=2, tp_rank=groups.tp_rank)
        return out, batched
    finally:
        shutdown_parallel()


def test_mask_tp2_equals_tp1_ties_included():
    from tti_dist.models.weight_sparsity import abs_topk_masks

    ranks = run_ranks(2, _mask_rank, 3)
    cases = _matrices(3)
    plain = [c for c in cases if c[3] == 0]
    for i, (w, par, k, j) in enumerate(cases):
        ref = abs_topk_masks([w], [par], [k], min_per_neuron=j)[0]
        got = torch.cat([ranks[r][0][i] for r in range(2)], dim=0 if par == "column" else 1)
        assert int(ref.sum()) == k and torch.equal(got, ref), (i, par, k, j)
    for i, (w, par, k, _) in enumerate(plain):
        ref = abs_topk_masks([w], [par], [k])[0]
        got = torch.cat([ranks[r][1][i] for r in range(2)], dim=0 if par == "column" else 1)
        assert torch.equal(got, ref), i


def _config(tp: int, dp: int, zero: int):
    overrides = [*BASE, f"train.steps={STEPS}", "train.eval_every=0", f"checkpoint.every={STEPS}",
                 f"parallel.tp_size={tp}", f"parallel.dp_size={dp}", f"zero.stage={zero}",
                 f"data.path={dataset_path()}", SPARSITY]
    cfg = load_config(None, overrides)
    validate_run_config(cfg, world_size=tp * dp)
    return cfg


@pytest.mark.slow
def test_zero2_training_keeps_exactly_the_scheduled_density(tmp_path):
    from tti_dist.models.weight_sparsity import selected_matrices
    from tti_dist.train.export import consolidated_state_dict

    cfg = _config(1, 2, 2)
    launch_local(cfg, str(tmp_path / "run"), nproc=2)
    ws = cfg.weight_sparsity
    matrices = selected_matrices(cfg.model, ws)
    table = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pydict()
    assert table["step"] == list(range(1, STEPS + 1))
    for i, step in enumerate(table["step"]):
        density = ws.density_at(step, STEPS)
        assert table["weights/target_density"][i] == pytest.approx(density)
        for m in matrices:
            assert table[f"weights/{m.name}/density"][i] == m.kept(density, ws.min_per_neuron) / m.numel
    _, master, _ = consolidated_state_dict(tmp_path / "run")  # from ZeRO's fp32 partitions
    module = torch.load(tmp_path / "run" / "checkpoints" / f"global_step{STEPS}" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    for m in matrices:
        w = master[f"{m.name}.weight"]
        assert int(torch.count_nonzero(w)) == math.floor(DENSITY * m.numel), m.name
        assert torch.equal(w != 0, module[f"{m.name}.weight"] != 0), m.name
