"""Splice metrics (tti_dist.sae.splice) and `tti sae fit` (tti_dist.commands.sae_fit, the CLI).

Splice metrics on real gloo ranks: TP=2 x DP=1 equals TP=1 x DP=2 (batches split over DP),
a perfect reconstruction recovers all the loss (CE recovered 1, delta 0, KL 0, EV 1), a zero
reconstruction none of it; CE matches a direct full-vocabulary cross entropy at TP=1.
`tti sae fit` on a tiny TP=2 run trained here: the JSON with its keys, EV > 0, L0 <= k;
bad inputs are one-line errors with exit code 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spawn import run_ranks

ROOT = Path(__file__).resolve().parents[2]
SITE = "blocks.1.resid_mid"
UP_SITE = "blocks.0.resid_post"
D = 32


def _model_cfg():
    from tti_dist.config.schema import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=D, num_heads=4, max_seq_len=16)


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 257, (3, 13), generator=g) for _ in range(4)]


def _identity_sae(groups):
    """A ReLU SAE with x_hat == x exactly: latents [I; -I] x, decoder [I, -I] (2d latents)."""
    from tti_dist.sae import ParallelSAE, SAEConfig

    sae = ParallelSAE(D, SAEConfig(num_latents=2 * D, activation="relu"), groups.tp_group if groups.tp_size > 1 else None,
                      groups.tp_size, groups.tp_rank)
    full_enc = torch.cat([torch.eye(D), -torch.eye(D)])  # [2d, d]
    lo, hi = sae.latent_offset, sae.latent_offset + sae.num_local_latents
    with torch.no_grad():
        sae.W_enc.copy_(full_enc[lo:hi])
        sae.W_dec.copy_(full_enc[lo:hi].t())
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    return sae


def _splice_metrics_all(groups) -> dict:
    import torch.nn.functional as F

    from tti_dist.models.gpt import GPT
    from tti_dist.sae import ParallelSAE, SAEConfig
    from tti_dist.capture.hookpoints import list_hookpoints
    from tti_dist.sae.splice import compound_splice_metrics, reconstruct_site, splice_metrics
    from tti_dist.utils.seeding import seed_weights

    seed_weights(0)
    model = GPT(_model_cfg(), groups)
    batches = _batches()
    if groups.dp_size > 1:  # DP: this rank's share of the batches
        batches = batches[groups.dp_rank::groups.dp_size]
    tp = groups.tp_group if groups.tp_size > 1 else None
    out = {}
    sae = ParallelSAE(D, SAEConfig(num_latents=64, k=4), tp, groups.tp_size, groups.tp_rank, seed=3)
    with torch.no_grad():
        sae.b_pre.normal_(generator=torch.Generator().manual_seed(5))
    out["random"] = splice_metrics(model, sae, SITE, batches, groups)
    out["identity"] = splice_metrics(model, _identity_sae(groups), SITE, batches, groups)
    zero = ParallelSAE(D, SAEConfig(num_latents=64, k=4), tp, groups.tp_size, groups.tp_rank)
    with torch.no_grad():
        zero.W_dec.zero_()
    out["zero"] = splice_metrics(model, zero, SITE, batches, groups)
    norm_sae = _identity_sae(groups)
    object.__setattr__(norm_sae, "cfg", SAEConfig(num_latents=2 * D, activation="relu", normalize_input=True))
    out["identity_normalized"] = splice_metrics(model, norm_sae, SITE, batches, groups)
    # Compound splicing: one site alone equals splice_metrics; two identity SAEs change nothing;
    # two random SAEs at once (checked against hand-placed hooks at TP=1).
    sae_up = ParallelSAE(D, SAEConfig(num_latents=64, k=6), tp, groups.tp_size, groups.tp_rank, seed=8)
    out["compound_one"] = compound_splice_metrics(model, {SITE: sae}, batches, groups)
    out["compound_identity"] = compound_splice_metrics(
        model, {UP_SITE: _identity_sae(groups), SITE: _identity_sae(groups)}, batches, groups)
    out["compound_two"] = compound_splice_metrics(model, {UP_SITE: sae_up, SITE: sae}, batches, groups)
    if groups.tp_size == 1:  # direct reference: full-vocabulary CE over the real vocabulary
        with torch.no_grad():
            ces = [F.cross_entropy(model(b[:, :-1])[..., :257].flatten(0, 1), b[:, 1:].flatten(), reduction="sum")
                   for b in batches]
            hps = {hp.name: hp.module for hp in list_hookpoints(model)}
            handles = [hps[name].register_forward_hook(lambda _m, _i, o, s=s: reconstruct_site(s, o)[1])
                       for name, s in ((UP_SITE, sae_up), (SITE, sae))]
            both = [F.cross_entropy(model(b[:, :-1])[..., :257].flatten(0, 1), b[:, 1:].flatten(), reduction="sum")
                    for b in batches]
            for h in handles:
                h.remove()
        out["ref_ce_sum"] = float(sum(ces))
        out["ref_compound_ce_sum"] = float(sum(both))
        out["ref_tokens"] = sum(b[:, 1:].numel() for b in batches)
    return out


def _splice_rank() -> dict:
    """On 2 ranks: TP=2 x DP=1 (megatron's groups), then TP=1 x DP=2 (singleton TP groups)."""
    import torch.distributed as dist

    from tti_dist.distributed.groups import ParallelGroups, init_parallel, shutdown_parallel

    groups = init_parallel(2, torch.device("cpu"), 120)
    try:
        tp2 = _splice_metrics_all(groups)
        singles = [dist.new_group([r]) for r in range(2)]
        world = dist.new_group([0, 1])
        g1 = ParallelGroups(device=groups.device, rank=groups.rank, world_size=2, tp_group=singles[groups.rank],
                            tp_rank=0, tp_size=1, dp_group=world, dp_rank=groups.rank, dp_size=2)
        tp1 = _splice_metrics_all(g1)
        return {1: tp1, 2: tp2}
    finally:
        shutdown_parallel()


@pytest.fixture(scope="module")
def splice_results():
    ranks = run_ranks(2, _splice_rank)
    return {tp: [r[tp] for r in ranks] for tp in (1, 2)}


def _key(name: str) -> str:
    return f"sae/{SITE}/{name}"


def test_splice_tp2_equals_tp1_dp2(splice_results):
    from tti_dist.sae.splice import METRIC_NAMES

    tp1, tp2 = splice_results[1], splice_results[2]
    for kind in ("random", "identity", "zero", "identity_normalized"):
        assert set(tp1[0][kind]) == {_key(n) for n in METRIC_NAMES}
        for results in (tp1, tp2):  # every rank of a job reports the same values
            assert results[1][kind] == pytest.approx(results[0][kind], rel=1e-9, abs=1e-12, nan_ok=True)
        assert tp2[0][kind] == pytest.approx(tp1[0][kind], rel=1e-4, abs=1e-6, nan_ok=True), kind


def test_compound_splice(splice_results):
    from tti_dist.sae.splice import COMPOUND_METRIC_NAMES

    def c(name):
        return f"sae/compound/{name}"

    tp1, tp2 = splice_results[1], splice_results[2]
    for kind in ("compound_one", "compound_identity", "compound_two"):
        assert set(tp1[0][kind]) == {c(n) for n in COMPOUND_METRIC_NAMES}
        for results in (tp1, tp2):
            assert results[1][kind] == pytest.approx(results[0][kind], rel=1e-9, abs=1e-12)
        assert tp2[0][kind] == pytest.approx(tp1[0][kind], rel=1e-4, abs=1e-6), kind
    for results in (tp1, tp2):
        one, single = results[0]["compound_one"], results[0]["random"]
        for name in ("ce_clean", "ce_spliced", "delta_lm_loss", "kl_spliced"):
            assert one[c(name)] == pytest.approx(single[_key(name)], rel=1e-6, abs=1e-9), name
        assert one[c("sum_l0")] == pytest.approx(single[_key("l0")], rel=1e-9)
        ident = results[0]["compound_identity"]
        assert ident[c("delta_lm_loss")] == pytest.approx(0.0, abs=1e-5)
        assert ident[c("kl_spliced")] == pytest.approx(0.0, abs=1e-6)
        two = results[0]["compound_two"]
        assert 4 < two[c("sum_l0")] <= 4 + 6
        # the upstream SAE changes what the downstream one sees (an untrained model: small but real)
        assert abs(two[c("ce_spliced")] - one[c("ce_spliced")]) > 1e-5
    ref = sum(r["ref_compound_ce_sum"] for r in tp1) / sum(r["ref_tokens"] for r in tp1)
    assert tp1[0]["compound_two"][c("ce_spliced")] == pytest.approx(ref, rel=1e-5)


def test_splice_ce_matches_direct_cross_entropy(splice_results):
    tp1 = splice_results[1]
    ref = sum(r["ref_ce_sum"] for r in tp1) / sum(r["ref_tokens"] for r in tp1)
    m = tp1[0]["random"]
    assert m[_key("ce_clean")] == pytest.approx(ref, rel=1e-5)
    assert m[_key("num_tokens")] == 4 * 3 * 12
    assert m[_key("ce_zero")] != pytest.approx(m[_key("ce_clean")], abs=1e-4)
    assert 0 < m[_key("l0")] <= 4
    assert 0 <= m[_key("dead_fraction")] < 1


@pytest.mark.parametrize("kind", ["identity", "identity_normalized"])
def test_splice_perfect_reconstruction(splice_results, kind):
    for results in splice_results.values():
        m = results[0][kind]
        assert m[_key("ce_loss_recovered")] == pytest.approx(1.0, abs=1e-4)
        assert m[_key("delta_lm_loss")] == pytest.approx(0.0, abs=1e-5)
        assert m[_key("kl_spliced")] == pytest.approx(0.0, abs=1e-6)
        assert m[_key("kl_score")] == pytest.approx(1.0, abs=1e-4)
        assert m[_key("ev")] == pytest.approx(1.0, abs=1e-5)
        assert m[_key("shrinkage")] == pytest.approx(1.0, abs=1e-5)
        assert m[_key("kl_zero")] > 0


def test_splice_zero_reconstruction(splice_results):
    for results in splice_results.values():
        m = results[0]["zero"]
        assert m[_key("ce_loss_recovered")] == pytest.approx(0.0, abs=1e-6)
        assert m[_key("kl_score")] == pytest.approx(0.0, abs=1e-6)
        assert m[_key("ce_spliced")] == pytest.approx(m[_key("ce_zero")], rel=1e-6)


# ---------------------------------------------------------------------- tti sae fit

FIT_SITE = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A TP=1 run of 6 steps on a byte-level stdlib dataset (trained in-process)."""
    from tti_dist.config import load_config
    from tti_dist.data.build import build_dataset
    from tti_dist.regularizers.validation import validate_run_config
    from tti_dist.train.worker import launch_local

    root = tmp_path_factory.mktemp("saefit")
    data = root / "data"
    build_dataset("stdlib", data, tokenizer="byte", val_fraction=0.05, max_bytes=200_000, overwrite=True)
    cfg = load_config(None, [
        "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.max_seq_len=32",
        "train.steps=6", "optim.warmup_steps=2", "train.micro_batch_size=4", "train.eval_every=0", "train.eval_batches=2",
        "data.seq_len=32", f"data.path={data}", "logging.progress_bar=false", "checkpoint.every=0",
        "parallel.tp_size=1", "parallel.dp_size=1", "zero.stage=0",
    ])
    validate_run_config(cfg, world_size=1)
    run_dir = root / "run"
    launch_local(cfg, str(run_dir), nproc=1)
    return run_dir


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tti_dist.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_sae_fit_cli_writes_metrics(tiny_run, tmp_path):
    out = tmp_path / "fit"
    proc = _cli("sae", "fit", str(tiny_run), "--site", FIT_SITE, "--latents", "64", "--k", "4", "--steps", "40",
                "--lr", "3e-3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ce_loss_recovered" in proc.stdout and "wrote" in proc.stdout
    record = json.loads((out / "sae_metrics.json").read_text())
    from tti_dist.sae.splice import METRIC_NAMES

    assert set(record["metrics"]) == {f"sae/{FIT_SITE}/{n}" for n in METRIC_NAMES}
    m = {k.rsplit("/", 1)[1]: v for k, v in record["metrics"].items()}
    assert m["ev"] > 0
    assert 0 < m["l0"] <= 4
    assert m["ce_zero"] > m["ce_clean"]
    assert record["checkpoint"] == "global_step6" and record["num_latents"] == 64 and record["k"] == 4
    assert record["train_log"][-1]["step"] == 40
    assert (out / "sae_tp_rank00.safetensors").is_file()


def test_sae_fit_several_sites_writes_compound_metrics(tiny_run):
    from tti_dist.sae.splice import COMPOUND_METRIC_NAMES

    proc = _cli("sae", "fit", str(tiny_run), "--site", "blocks.0.resid_post", "--site", FIT_SITE, "--latents", "32",
                "--k", "3", "--steps", "10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all 2 SAEs spliced in at once" in proc.stdout
    record = json.loads((tiny_run / "sae_fit" / "compound-n32-k3.json").read_text())
    assert record["sites"] == ["blocks.0.resid_post", FIT_SITE]
    assert set(record["metrics"]) == {f"sae/compound/{n}" for n in COMPOUND_METRIC_NAMES}
    per_site = [json.loads((tiny_run / "sae_fit" / f"{s}-n32-k3" / "sae_metrics.json").read_text())
                for s in record["sites"]]
    assert [r["site"] for r in per_site] == record["sites"]
    # TopK: at most k latents per site and token; the clean CE is the one of the per-site splices
    assert 0 < record["metrics"]["sae/compound/sum_l0"] <= 2 * 3
    assert record["metrics"]["sae/compound/ce_clean"] == pytest.approx(
        per_site[0]["metrics"]["sae/blocks.0.resid_post/ce_clean"], rel=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--site", FIT_SITE, "--site", FIT_SITE], "--site: blocks.1.resid_post given more than once"),
    (["--site", FIT_SITE, "--site", "blocks.0.resid_post", "--out", "x"], "--out: 'x' names one SAE's directory"),
    (["--site", "blocks.9.resid_post"], "--site: 'blocks.9.resid_post' is not a hookpoint"),
    (["--site", "blocks.0.mlp.act"], "split across tensor-parallel ranks"),
    (["--site", FIT_SITE, "--k", "100"], "--k: 100 must be in 1..latents (64)"),
    (["--site", FIT_SITE, "--nproc", "0"], "--nproc: 0"),
    (["--site", "blocks.1.resid_mid", "--target", "blocks.0.mlp.out"], "--target: 'blocks.0.mlp.out' with --site"),
    (["--site", "blocks.1.resid_mid", "--site", "blocks.0.resid_mid", "--target", "blocks.1.mlp.out"],
     "--target: a transcoder has one --site"),
    (["--site", "blocks.1.resid_mid", "--skip"], "--skip: only used with --target"),
])
def test_sae_fit_user_errors(tiny_run, capsys, args, message):
    from tti_dist.cli import main

    argv = ["sae", "fit", str(tiny_run), "--latents", "64", "--k", "4", *args]
    if "--k" in args:
        argv = ["sae", "fit", str(tiny_run), "--latents", "64", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tti: error: ") and message in err and "\n" not in err


def test_transcoder_fit_and_activation_flags(tiny_run, tmp_path):
    """`tti sae fit --target` fits a skip transcoder of blocks.1's MLP: the replacement metrics
    under transcoder/blocks.1.mlp/*, FVU below the initial 1, L0 <= k, its own shard name,
    and tti sae export refuses it in one line. `--activation matryoshka` with
    --matryoshka-prefixes fits that SAE (the flags reach the SAE's config)."""
    from tti_dist.sae.files import read_shard
    from tti_dist.sae.splice import METRIC_NAMES

    out = tmp_path / "tc"
    proc = _cli("sae", "fit", str(tiny_run), "--site", "blocks.1.resid_mid", "--target", "blocks.1.mlp.out",
                "--skip", "--latents", "64", "--k", "4", "--steps", "40", "--lr", "3e-3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skip transcoder blocks.1.resid_mid -> blocks.1.mlp.out" in proc.stdout
    record = json.loads((out / "sae_metrics.json").read_text())
    assert record["target"] == "blocks.1.mlp.out" and record["skip"] is True
    assert set(record["metrics"]) == {f"transcoder/blocks.1.mlp/{n}" for n in METRIC_NAMES}
    m = {k.rsplit("/", 1)[1]: v for k, v in record["metrics"].items()}
    print("transcoder fit", {k: round(m[k], 4) for k in ("fvu", "l0", "ce_loss_recovered", "dead_fraction")})
    assert m["fvu"] < 1.0 and 0 < m["l0"] <= 4 and m["ce_zero"] != m["ce_clean"]
    assert record["train_log"][0]["ev"] < record["train_log"][-1]["ev"]
    meta, state = read_shard(out / "transcoder_tp_rank00.safetensors")
    assert state["W_skip"].shape == (32, 32) and state["W_skip"].abs().sum() > 0
    assert not list(out.glob("sae_tp_rank*"))
    proc = _cli("sae", "export", str(out), "--out", str(tmp_path / "exported"))
    assert proc.returncode == 2 and "holds a transcoder" in proc.stderr and "\n" not in proc.stderr.strip()

    mat = tmp_path / "mat"
    proc = _cli("sae", "fit", str(tiny_run), "--site", FIT_SITE, "--latents", "32", "--k", "3", "--activation",
                "matryoshka", "--matryoshka-prefixes", "8,32", "--steps", "5", "--out", str(mat))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((mat / "sae_metrics.json").read_text())
    assert record["activation"] == "matryoshka" and record["target"] is None
    assert read_shard(mat / "sae_tp_rank00.safetensors")[0]["sae_config"]["matryoshka_prefixes"] == [8, 32]


def test_sae_fit_not_a_run_dir_subprocess(tmp_path):
    proc = _cli("sae", "fit", str(tmp_path), "--site", FIT_SITE, "--latents", "64", "--k", "4")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("tti: error: RUN:") and "\n" not in proc.stderr.strip()


@pytest.fixture(scope="module")
def tiny_run_tp2(tmp_path_factory):
    """A TP=2, ZeRO-1 run of 4 steps (2 ranks through the launcher)."""
    from tti_dist.config import load_config
    from tti_dist.data.build import build_dataset
    from tti_dist.regularizers.validation import validate_run_config
    from tti_dist.train.worker import launch_local

    root = tmp_path_factory.mktemp("saefit_tp2")
    data = root / "data"
    build_dataset("stdlib", data, tokenizer="byte", val_fraction=0.05, max_bytes=200_000, overwrite=True)
    cfg = load_config(None, [
        "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.max_seq_len=32",
        "train.steps=4", "optim.warmup_steps=2", "train.micro_batch_size=4", "train.eval_every=0", "train.eval_batches=2",
        "data.seq_len=32", f"data.path={data}", "logging.progress_bar=false", "checkpoint.every=0",
        "parallel.tp_size=2", "parallel.dp_size=1", "zero.stage=1",
    ])
    validate_run_config(cfg, world_size=2)
    run_dir = root / "run"
    launch_local(cfg, str(run_dir), nproc=2)
    return run_dir


def test_sae_fit_on_a_tp2_zero1_checkpoint(tiny_run_tp2, tmp_path):
    """The fit runs with the run's sharding (2 ranks, latents split over TP, ZeRO-1 weights)."""
    out = tmp_path / "fit"
    proc = _cli("sae", "fit", str(tiny_run_tp2), "--site", FIT_SITE, "--latents", "64", "--k", "4", "--steps", "20",
                "--lr", "3e-3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "sae_metrics.json").read_text())
    assert record["tp_size"] == 2
    m = {k.rsplit("/", 1)[1]: v for k, v in record["metrics"].items()}
    assert m["ev"] > 0 and 0 < m["l0"] <= 4 and m["ce_zero"] > m["ce_clean"]
    # Each TP rank saved its half of the latents.
    from tti_dist.sae.files import read_shard

    shards = [read_shard(out / f"sae_tp_rank0{r}.safetensors") for r in (0, 1)]
    assert [m["tp_rank"] for m, _ in shards] == [0, 1] and all(m["tp_size"] == 2 for m, _ in shards)
    for _, state in shards:
        assert state["W_dec"].shape == (32, 32)  # [d, 64 latents / 2]
    assert not torch.equal(shards[0][1]["W_dec"], shards[1][1]["W_dec"])


def test_sae_fit_latents_not_divisible_by_tp(tiny_run_tp2, capsys):
    from tti_dist.cli import main

    assert main(["sae", "fit", str(tiny_run_tp2), "--site", FIT_SITE, "--latents", "63", "--k", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tti: error: ") and "63" in err and "\n" not in err
