"""`type: sae` co-training regularizer: TP=2 equals TP=1 through the GPT (loss, model and SAE
gradients, SAE shards after its own optimizer step; TopK, ReLU, BatchTopK, JumpReLU, Matryoshka), the joint-mode gradient trick equals a
plain backward, detached mode leaves the model alone, a short single-rank run through the launcher (in-process, for speed)
(metrics, unit-norm decoder, exact resume), and config errors.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from spawn import run_ranks

HOOK = "blocks.1.resid_post"
JOINT = {"type": "sae", "name": "sae_j", "coefficient": 0.5, "hookpoints": [HOOK], "mode": "joint",
         "num_latents": 64, "k": 6, "aux_k": 8, "aux_coefficient": 0.25, "dead_window_tokens": 1,
         "b_pre_init": "geometric_median", "lr": 1e-2, "seed": 3, "redundancy_every": 1}
DETACHED = {"type": "sae", "name": "sae_d", "coefficient": 1.0, "hookpoints": [HOOK], "mode": "detached",
            "num_latents": 32, "activation": "relu", "l1_coefficient": 0.1, "normalize_input": True,
            "b_pre_init": "mean", "lr": 1e-2, "seed": 4}
# Lai et al.'s joint-training normalisation (recon and aux over mean ||x||), ReLU + L1 as in
# their runs, and TopK with AuxK to cover the aux term's normalisation.
LAI_RELU = {"type": "sae", "name": "sae_lai", "coefficient": 0.6, "hookpoints": [HOOK], "mode": "joint",
            "num_latents": 64, "activation": "relu", "l1_coefficient": 0.02, "recon_normalize": "input_norm",
            "b_pre_init": "zeros", "lr": 1e-2, "seed": 5}
LAI_TOPK = {**JOINT, "name": "sae_lai_k", "recon_normalize": "input_norm"}
# The SAE family through the regularizer: BatchTopK (joint, AuxK on the second micro-step),
# JumpReLU (detached; thresholds inside the inputs' range, so the L0 term has gradient) and
# Matryoshka (a prefix across the TP shard boundary at 32).
BATCHTOPK = {**JOINT, "name": "sae_btk", "activation": "batchtopk", "batchtopk_threshold_lr": 0.5, "seed": 6}
JUMPRELU = {"type": "sae", "name": "sae_jr", "coefficient": 1.0, "hookpoints": [HOOK], "mode": "detached",
            "num_latents": 32, "activation": "jumprelu", "l0_coefficient": 0.05, "jumprelu_bandwidth": 0.02,
            "jumprelu_init_threshold": 0.03, "b_pre_init": "mean", "lr": 1e-2, "seed": 7}
MATRYOSHKA = {**JOINT, "name": "sae_mat", "activation": "matryoshka", "matryoshka_prefixes": [8, 40, 64], "seed": 8}
# A joint skip transcoder of blocks.1's MLP (type: transcoder): the model gets the gradient at
# both sites; a unit-norm decoder, so the first step moves every weight.
TRANSCODER = {"type": "transcoder", "name": "tc", "coefficient": 0.5,
              "hookpoints": ["blocks.1.resid_mid", "blocks.1.mlp.out"], "mode": "joint", "skip": True,
              "normalize_decoder": True, "num_latents": 64, "k": 6, "aux_k": 8, "aux_coefficient": 0.25,
              "dead_window_tokens": 1, "lr": 1e-2, "seed": 9}
ENTRIES = {"joint": JOINT, "detached": DETACHED, "lai_relu": LAI_RELU, "lai_topk": LAI_TOPK,
           "batchtopk": BATCHTOPK, "jumprelu": JUMPRELU, "matryoshka": MATRYOSHKA, "transcoder": TRANSCODER}
SAE_LAYOUT = {"W_enc": 0, "b_enc": 0, "W_dec": 1, "b_pre": None, "log_threshold": 0, "W_skip": None}


def _tokens(i: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(100 + i))


def _rank() -> dict:
    from tti_dist.capture import ActivationCapture
    from tti_dist.config.schema import ModelConfig
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.gpt import GPT, tp_partition_dims
    from tti_dist.regularizers import build_regularizers, checked_regularizers
    from tti_dist.sae import ParallelSAE
    from tti_dist.utils.seeding import seed_weights

    world = int(os.environ["WORLD_SIZE"])
    groups = init_parallel(world, torch.device("cpu"), 120)
    try:
        cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_seq_len=16)
        out = {"tp_rank": groups.tp_rank}
        for key, entry in ENTRIES.items():
            seed_weights(5)
            model = GPT(cfg, groups)
            (reg,) = build_regularizers(checked_regularizers([entry], cfg, groups.tp_size), model, groups)
            res = {"layout": tp_partition_dims(model), "weighted": [], "metrics": [], "acts": []}
            # Two micro-steps (the second has dead latents, so AuxK is active), then the SAE's step.
            with ActivationCapture(reg.captures) as cap:
                for i in range(2):
                    model(_tokens(i))
                    weighted, metrics = reg(cap.captured, step=0)
                    res["acts"].append(cap.captured[reg.captures[0].name].detach().clone())
                    res["requires_grad"] = weighted.requires_grad
                    if weighted.requires_grad:
                        weighted.backward()
                    res["weighted"].append(weighted.detach())
                    res["metrics"].append(metrics)
                    cap.clear()
            res["model_grads"] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            res["sae_grads"] = {k: p.grad.clone() / 2 for k, p in reg.sae.named_parameters() if p.requires_grad}
            res["sae_before"] = {k: v.detach().clone() for k, v in reg.sae.named_parameters()}
            reg.after_optimizer_step()
            res["sae_after"] = {k: v.detach().clone() for k, v in reg.sae.named_parameters()}
            res["state"] = reg.state_dict()
            out[key] = res
        if groups.tp_size == 1:
            # Reference for the joint-mode gradient trick: a plain backward of
            # coefficient x training loss through an identical SAE, on the same activations.
            seed_weights(5)
            model = GPT(cfg, groups)
            (reg,) = build_regularizers(checked_regularizers([JOINT], cfg), model, groups)
            sae = ParallelSAE(32, reg.sae_cfg, seed=JOINT["seed"])
            tracker_dead = torch.zeros(64, dtype=torch.bool)
            with ActivationCapture(reg.captures) as cap:
                for i in range(2):
                    model(_tokens(i))
                    a = cap.captured[HOOK]
                    if i == 0:
                        sae.init_b_pre(a.detach())
                    o = sae(a)
                    loss, _ = sae.training_loss(o.x_in, o, tracker_dead, normalize="fvu")
                    (JOINT["coefficient"] * loss).backward()
                    tracker_dead = (o.latents.reshape(-1, 64) != 0).sum(0) == 0  # window of 1 token
                    cap.clear()
            out["ref_model_grads"] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            out["ref_sae_grads"] = {k: p.grad.clone() / JOINT["coefficient"] / 2 for k, p in sae.named_parameters()}
        return out
    finally:
        shutdown_parallel()


@pytest.fixture(scope="module")
def tp_results():
    return run_ranks(1, _rank)[0], run_ranks(2, _rank)


def _shard(full, dim, rank, size=2):
    return full if dim is None else full.chunk(size, dim=dim)[rank]


def _assert_no_bias_gradient(g, grads):
    """b_dec refitted to the batch's mean residual (all DP ranks): the error sums to 0 over the
    tokens, so the MLP's output bias gets no gradient from the transcoder, up to rounding."""
    top = max(t.abs().max().item() for t in grads.values())
    assert g.abs().max() < 1e-4 * top, g.abs().max()


def _close(got, want, what, rtol=1e-5):
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5 * scale + 1e-12, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("key", list(ENTRIES))
def test_tp2_equals_tp1(tp_results, key):
    ref, ranks = tp_results[0][key], [{**r[key], "tp_rank": r["tp_rank"]} for r in tp_results[1]]
    for r in ranks:
        rank = r["tp_rank"]
        for i in range(2):
            torch.testing.assert_close(r["weighted"][i], ref["weighted"][i], rtol=1e-5, atol=0)
            assert r["metrics"][i].keys() == ref["metrics"][i].keys()
            for tag, v in r["metrics"][i].items():
                torch.testing.assert_close(v, ref["metrics"][i][tag], rtol=1e-4, atol=1e-6, msg=lambda m: f"{tag}: {m}")
        assert r["model_grads"].keys() == ref["model_grads"].keys()
        for name, g in r["model_grads"].items():
            if key == "transcoder" and name == "blocks.1.mlp.fc2.bias":
                _assert_no_bias_gradient(g, ref["model_grads"])
                _assert_no_bias_gradient(ref["model_grads"][name], ref["model_grads"])
                continue
            _close(g, _shard(ref["model_grads"][name], r["layout"][name], rank), name)
        for which in ("sae_grads", "sae_before"):
            for name, t in r[which].items():
                _close(t, _shard(ref[which][name], SAE_LAYOUT[name], rank), f"{which}.{name}")
        # After Adam's first step each element moved by lr * g / (|g| + eps): for a gradient
        # element near 0 that ratio amplifies float noise, so the step is compared to 1% of lr.
        lr = ENTRIES[key]["lr"]
        for name, t in r["sae_after"].items():
            want = _shard(ref["sae_after"][name], SAE_LAYOUT[name], rank)
            torch.testing.assert_close(t, want, rtol=0, atol=1e-2 * lr, msg=lambda m: f"sae_after.{name}: {m}")
        # The SAE moved, its decoder is unit-norm, and b_pre is the same on both TP ranks.
        assert not torch.equal(r["sae_after"]["W_enc"], r["sae_before"]["W_enc"])
        torch.testing.assert_close(r["sae_after"]["W_dec"].norm(dim=0), torch.ones(r["sae_after"]["W_dec"].shape[1]))
    assert torch.equal(ranks[0]["sae_after"]["b_pre"], ranks[1]["sae_after"]["b_pre"])


def test_joint_metrics_and_aux(tp_results):
    ref = tp_results[0]["joint"]
    m0, m1 = ref["metrics"]
    assert m0["reg/sae_j/aux_k"].item() == 0.0  # nothing dead before the first micro-batch
    assert m1["reg/sae_j/aux_k"].item() > 0.0  # dead_window_tokens 1: unfired latents are dead
    assert 0 < m1["reg/sae_j/dead_fraction"].item() < 1
    assert m0["reg/sae_j/l0"].item() <= JOINT["k"]
    for tag in ("explained_variance", "shrinkage", "recon_loss", "dense_fraction_1pct", "dense_fraction_10pct",
                "decoder_redundancy", "loss", "coefficient"):
        assert f"reg/sae_j/{tag}" in m0, tag
    assert m0["reg/sae_j/coefficient"].item() == JOINT["coefficient"]


def test_joint_gradients_equal_plain_backward(tp_results):
    """The surrogate loss (value L, gradient dL/da, none to the SAE) gives the model
    coefficient x dL/da, and the SAE its unweighted micro-step-mean gradient."""
    ref = tp_results[0]
    got = ref["joint"]
    assert got["requires_grad"]
    for name, g in got["model_grads"].items():
        _close(g, ref["ref_model_grads"][name], name)
    for name, g in got["sae_grads"].items():
        _close(g, ref["ref_sae_grads"][name], name)


def test_detached_gives_model_no_gradient(tp_results):
    for r in [tp_results[0], *tp_results[1]]:
        res = r["detached"]
        assert not res["requires_grad"] and res["model_grads"] == {}
        assert all(g.abs().sum() > 0 for g in res["sae_grads"].values())
        assert "reg/sae_d/l1" in res["metrics"][0] and "reg/sae_d/aux_k" not in res["metrics"][0]


def test_sae_family_metrics(tp_results):
    """The family's own terms reach the regularizer's metrics: BatchTopK's running threshold
    (set by the first batch, then an EMA) and AuxK, JumpReLU's L0 penalty (equal to its L0,
    no AuxK), Matryoshka's inner prefix losses."""
    btk = tp_results[0]["batchtopk"]["metrics"]
    theta = [m["reg/sae_btk/batchtopk_threshold"].item() for m in btk]
    assert theta[0] > 0 and theta[1] > 0 and theta[0] != theta[1]
    assert btk[1]["reg/sae_btk/aux_k"].item() > 0
    assert 0 < btk[0]["reg/sae_btk/l0"].item() <= BATCHTOPK["k"]  # k T selected per batch, some may be <= 0
    jr = tp_results[0]["jumprelu"]["metrics"][0]
    assert jr["reg/sae_jr/l0_penalty"].item() == pytest.approx(jr["reg/sae_jr/l0"].item(), rel=1e-6)
    assert jr["reg/sae_jr/l0"].item() > 0
    assert "reg/sae_jr/aux_k" not in jr
    assert tp_results[0]["jumprelu"]["sae_grads"]["log_threshold"].abs().sum() > 0
    mat = tp_results[0]["matryoshka"]["metrics"][0]
    assert mat["reg/sae_mat/matryoshka_inner"].item() > 0 and mat["reg/sae_mat/recon_loss"].item() > 0


def test_transcoder_entry(tp_results):
    """type: transcoder in the same loop: the model received gradient (joint), the skip term
    trained, the metrics describe the MLP output's reconstruction."""
    for r in [tp_results[0], *tp_results[1]]:
        res = r["transcoder"]
        assert res["requires_grad"] and any(k.startswith("blocks.1.mlp") for k in res["model_grads"])
        assert res["sae_grads"]["W_skip"].abs().sum() > 0
        assert not torch.equal(res["sae_after"]["W_skip"], res["sae_before"]["W_skip"])
    m = tp_results[0]["transcoder"]["metrics"][1]
    assert m["reg/tc/aux_k"].item() > 0 and 0 < m["reg/tc/l0"].item() <= TRANSCODER["k"]
    assert {"reg/tc/explained_variance", "reg/tc/dead_fraction", "reg/tc/recon_loss"} <= set(m)


def test_state_dict_contents(tp_results):
    state = tp_results[0]["joint"]["state"]
    assert state["steps"] == 1 and state["calls"] == 2 and state["b_pre_ready"]
    assert set(state["sae"]) == {"W_enc", "b_enc", "W_dec", "b_pre"}
    assert len(state["optimizer"]["state"]) == 4
    assert state["tracker"]["tokens_since_fired"].shape == (64,)


# ---------------------------------------------------------------- config errors

def _parse(entry: dict, tp_size: int = 1):
    from tti_dist.config.schema import ModelConfig
    from tti_dist.regularizers import checked_regularizers

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_seq_len=16)
    return checked_regularizers([entry], cfg, tp_size)


@pytest.mark.parametrize("change, tp_size, match", [
    ({"k": 65}, 1, r"regularizers\[0\]\.k: 65 is larger than the whole SAE"),
    ({"num_latents": 66}, 4, r"regularizers\[0\]\.num_latents: 66 must be divisible by tp_size 4"),
    ({"hookpoints": ["blocks.0.mlp.act"]}, 2, r"regularizers\[0\]\.hookpoints: blocks\.0\.mlp\.act is split"),
    ({"hookpoints": ["blocks.*.resid_post"]}, 1, r"regularizers\[0\]\.hookpoints: matches 2 sites"),
    ({"hookpoints": [HOOK, "blocks.0.resid_pre"]}, 1, r"regularizers\[0\]\.hookpoints: matches 2 sites"),
    ({"mode": "both"}, 1, r"regularizers\[0\]\.mode: 'both' is not allowed"),
    ({"lr": 0}, 1, r"regularizers\[0\]\.lr: 0\.0 must be a finite number > 0"),
    ({"betas": [0.9]}, 1, r"regularizers\[0\]\.betas"),
])
def test_config_errors(change, tp_size, match):
    from tti_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=match) as info:
        _parse({**JOINT, **change}, tp_size)
    assert "\n" not in str(info.value)


def test_valid_config_parses():
    (spec,) = _parse(JOINT, 2)
    assert spec.params.mode == "joint" and spec.params.k == 6


# ---------------------------------------------------------------- through the product

STEPS = 8
# and a detached skip transcoder of blocks.1's MLP next to it (coefficient 0: the run's loss is
# the same), whose target's mean moves with the young model's own MLP bias.
RUN_REG = ("regularizers=[{type: sae, name: sae, coefficient: 0.5, hookpoints: ['blocks.1.resid_post'], mode: joint,"
           " num_latents: 64, k: 4, aux_k: 8, dead_window_tokens: 256, lr: 3e-3, redundancy_every: 2},"
           " {type: transcoder, name: tc, coefficient: 0.0, hookpoints: ['blocks.1.resid_mid', 'blocks.1.mlp.out'],"
           " mode: detached, skip: true, num_latents: 64, k: 4, lr: 1e-3}]")
RUN_BASE = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.max_seq_len=16",
    "optim.lr=3e-3", "optim.warmup_steps=2", "optim.grad_clip=1.0",
    f"train.steps={STEPS}", "train.micro_batch_size=2", "train.grad_accum_steps=2", f"train.eval_every={STEPS}",
    "train.eval_batches=2",
    "data.seq_len=16", "logging.progress_bar=false", "checkpoint.every=4", "checkpoint.keep_last=0",
    "parallel.tp_size=1", "parallel.dp_size=1", "zero.stage=1", RUN_REG,
]
DATASET_DIR = Path(os.environ.setdefault(
    "TTI_TEST_SAE_DATASET_DIR", str(Path(tempfile.gettempdir()) / f"tti-test-sae-byte-{os.getpid()}")))


@pytest.fixture(scope="module")
def run_cfg():
    from tti_dist.config import load_config
    from tti_dist.data.build import build_dataset
    from tti_dist.regularizers.validation import validate_run_config

    build_dataset("stdlib", DATASET_DIR, tokenizer="byte", val_fraction=0.05, max_bytes=200_000, overwrite=True)
    cfg = load_config(None, RUN_BASE + [f"data.path={DATASET_DIR}"])
    validate_run_config(cfg, world_size=1)
    yield cfg
    shutil.rmtree(DATASET_DIR, ignore_errors=True)


def test_training_run_metrics_and_resume(run_cfg, tmp_path):
    from tti_dist.train.worker import launch_local

    straight_dir = tmp_path / "straight"
    results = launch_local(run_cfg, str(straight_dir), nproc=1)
    straight = results[0]
    assert all(r.losses == straight.losses for r in results.values())
    assert sorted(straight.losses) == list(range(1, STEPS + 1))
    table = pq.read_table(straight_dir / "metrics.parquet")
    for tag in ("loss", "recon_loss", "aux_k", "l0", "explained_variance", "shrinkage", "dead_fraction",
                "dense_fraction_1pct", "dense_fraction_10pct", "decoder_redundancy", "coefficient"):
        col = table.column(f"reg/sae/{tag}").to_pylist()
        assert len(col) == STEPS and all(v == v for v in col), tag
    # At the eval step, the co-trained SAE's splice metrics (sae/<site>/*) are logged.
    site = "sae/blocks.1.resid_post/"
    for tag in ("ce_loss_recovered", "delta_lm_loss", "kl_score", "ev", "l0", "dead_fraction"):
        values = [v for v in table.column(site + tag).to_pylist() if v is not None]
        assert len(values) == 1 and values[0] == values[0], tag
    assert [v for v in table.column(site + "l0").to_pylist() if v is not None][0] <= 4
    ev = table.column("reg/sae/explained_variance").to_pylist()
    recon = table.column("reg/sae/recon_loss").to_pylist()
    print("recon_loss", [round(v, 3) for v in recon], "EV", [round(v, 3) for v in ev])
    assert recon[-1] < 0.75 * recon[0]  # the SAE learns (0.69 -> 0.42 when recorded)
    # recon_normalize fvu: the normalized loss is 1 - EV of the micro-batch, so the model
    # cannot lower it while EV falls (it could with per-token ||x||^2 normalization).
    assert ev[-1] > 0.5 and ev[-1] > ev[0]
    assert all(v <= 4 for v in table.column("reg/sae/l0").to_pylist())
    # The transcoder's live EV of blocks.1.mlp.out stays >= 0 and grows while the MLP output's
    # mean moves with the model (b_dec refitted per micro-step: 0.0 -> 0.028 when recorded; an
    # Adam-trained b_dec lagged the mean: -0.59 after one step, -0.54 after 8).
    tc_ev = table.column("reg/tc/explained_variance").to_pylist()
    print("transcoder EV", [round(v, 3) for v in tc_ev])
    assert min(tc_ev) > -1e-4 and tc_ev[-1] > 0.01

    # The SAE's state lives in the checkpoint's client_state (once per TP rank).
    (states,) = list((straight_dir / "checkpoints" / f"global_step{STEPS}").glob("mp_rank_00_model_states.pt"))
    client = torch.load(states, map_location="cpu", weights_only=False)
    sae_state = client["regularizers"]["sae"]
    assert sae_state["steps"] == STEPS and sae_state["calls"] == 2 * STEPS
    w_dec = sae_state["sae"]["W_dec"]
    torch.testing.assert_close(w_dec.norm(dim=0), torch.ones(w_dec.shape[1]))
    first = torch.load(straight_dir / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["regularizers"]["sae"]["sae"]["W_enc"]
    assert not torch.equal(first, sae_state["sae"]["W_enc"])

    # 4 steps + resume + 4 steps == 8 straight steps, exactly (joint mode: the SAE shapes the loss).
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight_dir / "checkpoints" / "global_step4", resumed_dir / "checkpoints" / "global_step4")
    (resumed_dir / "checkpoints" / "latest").write_text("global_step4")
    resumed = launch_local(run_cfg, str(resumed_dir), nproc=1, resume=True)[0]
    assert sorted(resumed.losses) == list(range(5, STEPS + 1))
    for step in range(5, STEPS + 1):
        assert resumed.losses[step] == straight.losses[step], step
    resumed_state = torch.load(resumed_dir / "checkpoints" / f"global_step{STEPS}" / "mp_rank_00_model_states.pt",
                               map_location="cpu", weights_only=False)["regularizers"]["sae"]
    for name, t in sae_state["sae"].items():
        assert torch.equal(resumed_state["sae"][name], t), name
    # The transcoder's refitted b_dec round-trips through the checkpoint (resumed == straight).
    tc_dir = "checkpoints/global_step{}/mp_rank_00_model_states.pt"
    tc_straight, tc_resumed, tc_first = (
        torch.load(d / tc_dir.format(s), map_location="cpu", weights_only=False)["regularizers"]["tc"]["sae"]
        for d, s in ((straight_dir, STEPS), (resumed_dir, STEPS), (straight_dir, 4)))
    assert not torch.equal(tc_first["b_pre"], tc_straight["b_pre"])
    for name, t in tc_straight.items():
        assert torch.equal(tc_resumed[name], t), f"tc.{name}"


# -- data parallelism: the SAE's own optimizer sees the DP-averaged gradient -------------------
# recon_normalize none (MSE) and b_pre from the mean: both are means over tokens, so DP=2 on
# two halves of a batch equals DP=1 on the whole batch exactly (FVU's denominator and the
# geometric median are per-rank / iterative, not batch means).
DP_ENTRY = {"type": "sae", "name": "sae_dp", "coefficient": 0.5, "hookpoints": [HOOK], "mode": "joint",
            "recon_normalize": "none", "num_latents": 64, "k": 6, "b_pre_init": "mean", "lr": 1e-2, "seed": 7}
# A transcoder's b_dec refit averages the batch's mean residual over DP: one b_dec on every rank.
DP_TRANSCODER = {**DP_ENTRY, "type": "transcoder", "name": "sae_dp",
                 "hookpoints": ["blocks.1.resid_mid", "blocks.1.mlp.out"], "skip": True}


def _dp_rank(entries: tuple[dict, ...] = (DP_ENTRY,)) -> list[dict]:
    """Each entry's two co-trained steps on this rank's rows (one process group for all)."""
    from tti_dist.capture import ActivationCapture
    from tti_dist.config.schema import ModelConfig
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.gpt import GPT
    from tti_dist.regularizers import build_regularizers, checked_regularizers
    from tti_dist.utils.seeding import seed_weights

    groups = init_parallel(1, torch.device("cpu"), 120)  # world 1 or 2 -> DP = world
    results = []
    try:
        for entry in entries:
            cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_seq_len=16)
            seed_weights(5)
            model = GPT(cfg, groups)
            (reg,) = build_regularizers(checked_regularizers([entry], cfg, 1), model, groups)
            out = {"metrics": []}
            with ActivationCapture(reg.captures) as cap:
                for step in range(2):
                    batch = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(200 + step))
                    rows = batch.chunk(groups.dp_size)[groups.dp_rank]
                    model(rows)
                    weighted, metrics = reg(cap.captured, step=step)
                    weighted.backward()
                    cap.clear()
                    out["metrics"].append(metrics)
                    reg.after_optimizer_step()
            # What DeepSpeed does with the model's gradients: the mean over the DP group.
            grads = {}
            for k, p in model.named_parameters():
                if p.grad is not None:
                    g = p.grad.clone()
                    torch.distributed.all_reduce(g, group=groups.dp_group)
                    grads[k] = g / groups.dp_size
            out["model_grads"] = grads
            out["sae"] = {k: v.detach().clone() for k, v in reg.sae.named_parameters()}
            results.append(out)
        return results
    finally:
        shutdown_parallel()


DP_CASES = {"sae": DP_ENTRY, "transcoder": DP_TRANSCODER}


@pytest.fixture(scope="module")
def dp_results():
    """(DP=1 result, DP=2 results) per case: one 1-rank and one 2-rank spawn for all cases."""
    entries = tuple(DP_CASES.values())
    (ref,) = run_ranks(1, _dp_rank, entries)
    ranks = run_ranks(2, _dp_rank, entries)
    return {name: (ref[i], [ranks[0][i], ranks[1][i]]) for i, name in enumerate(DP_CASES)}


@pytest.mark.parametrize("case", list(DP_CASES))
def test_dp2_sae_step_equals_dp1(dp_results, case):
    entry = DP_CASES[case]
    ref, ranks = dp_results[case]
    for name, t in ranks[0]["sae"].items():
        assert torch.equal(t, ranks[1]["sae"][name]), f"DP replicas of the SAE diverged: {name}"
        _close(t, ref["sae"][name], f"sae.{name}")
    for name, g in ranks[0]["model_grads"].items():
        if entry is DP_TRANSCODER and name == "blocks.1.mlp.fc2.bias":
            _assert_no_bias_gradient(g, ranks[0]["model_grads"])
            _assert_no_bias_gradient(ref["model_grads"][name], ref["model_grads"])
            continue
        _close(g, ref["model_grads"][name], name)
    for step in range(2):
        mean_loss = (ranks[0]["metrics"][step]["reg/sae_dp/loss"] + ranks[1]["metrics"][step]["reg/sae_dp/loss"]) / 2
        torch.testing.assert_close(mean_loss, ref["metrics"][step]["reg/sae_dp/loss"], rtol=1e-5, atol=0)
