"""`tti sae export` (tti_dist.sae.saelens_format): SAELens loads what it writes and computes
tti's SAE exactly, also spliced into the run opened with TransformerLens.

One TP=2 run trained here with three co-trained SAEs (TopK and ReLU, latents sharded over
the two TP ranks, and a TopK one on final_norm), plus a `tti sae fit` SAE on it at TP=2.
The reference is tti's own SAE (the TP shards side by side) on the run's real activations:
`sae_lens.SAE.load_from_disk(DIR)` must encode and decode them to within 1e-5 (fp32).
Then the run exported with `tti export --format hf` and opened with TransformerLens'
TransformerBridge: every mapped hook reads what tti's site reads, and the next-token CE with
the SAE spliced in (SAELens's run_with_saes, or by hand where the bridge's hook is not the
residual stream) equals tti's own splice metric to 1e-4. Error cases exit 2 and write nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
TOPK_SITE = "blocks.1.resid_post"
RELU_SITE = "blocks.0.resid_mid"
FIT_SITE = "blocks.0.resid_post"
ENTRIES = (
    "regularizers=["
    f"{{type: sae, name: sae_k, coefficient: 0.3, hookpoints: ['{TOPK_SITE}'], mode: joint, num_latents: 64, k: 6,"
    " aux_k: 8, dead_window_tokens: 64, lr: 1e-2, redundancy_every: 0},"
    f" {{type: sae, name: sae_r, coefficient: 0.3, hookpoints: ['{RELU_SITE}'], mode: detached, num_latents: 32,"
    " activation: relu, l1_coefficient: 0.05, b_pre_init: mean, lr: 1e-2, redundancy_every: 0},"
    " {type: sae, name: sae_final, coefficient: 0.1, hookpoints: ['final_norm'], mode: detached, num_latents: 32,"
    " k: 4, lr: 1e-2, redundancy_every: 0}]"
)
STEPS = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A TP=2 run with the three SAE entries, and a tti sae fit SAE (TP=2) on FIT_SITE."""
    from tti_dist.cli import main as cli_main
    from tti_dist.config import load_config
    from tti_dist.data.build import build_dataset
    from tti_dist.regularizers.validation import validate_run_config
    from tti_dist.train.worker import launch_local

    root = tmp_path_factory.mktemp("saeexport")
    data = root / "data"
    build_dataset("stdlib", data, tokenizer="byte", val_fraction=0.05, max_bytes=100_000, overwrite=True)
    cfg = load_config(None, [
        "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.max_seq_len=32",
        f"train.steps={STEPS}", "optim.lr=3e-3", "optim.warmup_steps=2", "train.micro_batch_size=4",
        f"train.eval_every={STEPS}", "train.eval_batches=2", "data.seq_len=32", f"data.path={data}",
        "logging.progress_bar=false", "checkpoint.every=0", "parallel.tp_size=2", "parallel.dp_size=1",
        "zero.stage=0", ENTRIES,
    ])
    validate_run_config(cfg, world_size=2)
    run_dir = root / "run"
    launch_local(cfg, str(run_dir), nproc=2)
    fit_dir = root / "fit"
    code = cli_main(["sae", "fit", str(run_dir), "--site", FIT_SITE, "--latents", "32", "--k", "4", "--steps", "30",
                     "--lr", "3e-3", "--nproc", "2", "--out", str(fit_dir)])
    assert code == 0
    return {"run": run_dir, "fit": fit_dir, "cfg": cfg}


def _shards(run_dir: Path, fit_dir: Path) -> dict:
    """Each SAE's (site, settings, [TP rank 0 state, TP rank 1 state]), read straight from
    the checkpoint's client state and the fit's shard files."""
    from tti_dist.config.sae import SAEConfig
    from tti_dist.rundir import RunDir
    from tti_dist.sae.files import read_shard, shard_name

    run = RunDir(run_dir)
    cfg = run.load_config()
    tag = run.latest_tag()
    clients = [torch.load(run.checkpoints / tag / f"mp_rank_{r:02d}_model_states.pt", map_location="cpu",
                          weights_only=False)["regularizers"] for r in range(2)]
    fits = [read_shard(fit_dir / shard_name(r)) for r in range(2)]
    entries = {r.name: r.params for r in cfg.regularizers}
    return {
        "sae_k": (TOPK_SITE, entries["sae_k"], [c["sae_k"]["sae"] for c in clients]),
        "sae_r": (RELU_SITE, entries["sae_r"], [c["sae_r"]["sae"] for c in clients]),
        "fit": (FIT_SITE, SAEConfig(**fits[0][0]["sae_config"]), [state for _, state in fits]),
    }


def _reference(run_dir: str, fit_dir: str, weights: str, groups) -> dict:
    """tti's own SAEs on the run's validation activations (the model at TP=1 from its
    consolidated weights). Each SAE is the TP=1 ParallelSAE holding the two TP shards side by
    side (TP rank r owns latents [r n/2, (r+1) n/2); tests/distributed/test_sae_parallel.py
    shows the TP=2 forward equals it)."""
    from tti_dist.capture.hookpoints import ActivationCapture, list_hookpoints
    from tti_dist.data.loader import DistributedBatchLoader
    from tti_dist.data.prepare import run_windows
    from tti_dist.rundir import RunDir
    from tti_dist.sae.model import ParallelSAE
    from tti_dist.train.export import load_frozen_model

    cfg = RunDir(Path(run_dir)).load_config()
    model = load_frozen_model(cfg, Path(run_dir), "", groups, weights=weights)
    val = DistributedBatchLoader(run_windows(cfg), "val", cfg.train.micro_batch_size, 0, 1, cfg.train.seed,
                                 shuffle=False)
    batches = val.fixed_batches(cfg.train.eval_batches)
    hps = {hp.name: hp for hp in list_hookpoints(model)}
    with ActivationCapture(list(hps.values())) as cap, torch.no_grad():  # every site, for the hook-name table
        model(batches[0][:, :-1])
        out = {"sites": {name: t.detach().clone() for name, t in cap.captured.items()},
               "batches": [b.clone() for b in batches]}
    for key, (site, sae_cfg, shards) in _shards(Path(run_dir), Path(fit_dir)).items():
        sae = ParallelSAE(32, sae_cfg)
        full = {"W_enc": torch.cat([s["W_enc"] for s in shards], 0), "b_enc": torch.cat([s["b_enc"] for s in shards]),
                "W_dec": torch.cat([s["W_dec"] for s in shards], 1), "b_pre": shards[0]["b_pre"]}
        sae.load_state_dict(full)
        with ActivationCapture([hps[site]]) as cap, torch.no_grad():
            acts = []
            for b in batches:
                model(b[:, :-1])
                acts.append(cap.captured[site].detach().clone())
                cap.clear()
            x = torch.cat(acts)
            o = sae(x)
        half = sae_cfg.num_latents // 2
        out[key] = {"x": x, "latents": o.latents, "x_hat": o.x_hat,
                    "fired_per_rank": [int(torch.count_nonzero(o.latents[..., :half])),
                                       int(torch.count_nonzero(o.latents[..., half:]))]}
    return out


@pytest.fixture(scope="module")
def reference(run):
    from tti_dist.commands.ranks import run_in_rank_sessions
    from tti_dist.train.export import export_safetensors

    weights = export_safetensors(run["run"], run["run"].parent / "model.safetensors")
    results, code = run_in_rank_sessions("sae export reference", 1, run["cfg"], 1, None, _reference,
                                         str(run["run"]), str(run["fit"]), str(weights))
    assert code is None
    return results[0]


def _export(capsys, *args: str) -> tuple[int, str]:
    from tti_dist.cli import main as cli_main

    code = cli_main(["sae", "export", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("key, args, arch, hook", [
    ("sae_k", ["--name", "sae_k"], "topk", "blocks.1.hook_resid_post"),
    ("sae_r", ["--name", "sae_r", "--checkpoint", str(STEPS)], "standard", "blocks.0.hook_resid_mid"),
    ("fit", [], "topk", "blocks.0.hook_resid_post"),
])
def test_saelens_loads_and_matches(run, reference, tmp_path, capsys, key, args, arch, hook):
    from sae_lens import SAE

    source = run["fit"] if key == "fit" else run["run"]
    out = tmp_path / "exported"
    code, text = _export(capsys, str(source), "--out", str(out), *args)
    assert code == 0, text
    sae = SAE.load_from_disk(out)
    assert sae.cfg.architecture() == arch and sae.cfg.metadata.hook_name == hook
    assert sae.cfg.metadata.context_size == 32 and sae.cfg.metadata.prepend_bos is False
    ref = reference[key]
    # Both TP ranks' latents fire, so a wrong merge order or layout would show.
    assert min(ref["fired_per_rank"]) > 0
    with torch.no_grad():
        f = sae.encode(ref["x"])
        x_hat = sae.decode(f)
        x_hat_direct = sae.decode(ref["latents"])
    enc_diff = (f - ref["latents"]).abs().max().item()
    dec_diff = (x_hat - ref["x_hat"]).abs().max().item()
    print(f"{key}: max |f - f_tti| {enc_diff:.3g}, max |x_hat - x_hat_tti| {dec_diff:.3g}, "
          f"scale |f| {ref['latents'].abs().max().item():.3g}")
    assert enc_diff <= 1e-5
    assert dec_diff <= 1e-5
    assert (x_hat_direct - ref["x_hat"]).abs().max().item() <= 1e-5
    assert torch.equal(f != 0, ref["latents"] != 0)  # the same latents selected / active
    if arch == "topk":
        assert int((f != 0).sum(-1).max()) <= sae.cfg.k
    provenance = json.loads((out / "tti_provenance.json").read_text())
    assert provenance["tp_size"] == 2 and provenance["hook_name"] == hook
    assert provenance["kind"] == ("fit" if key == "fit" else "cotrained")
    assert provenance["checkpoint"] == f"global_step{STEPS}"
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors", "tti_provenance.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("args, message", [
    ([], "tti: error: --name: RUN has 3 `type: sae` entries (sae_k, sae_r, sae_final); choose one with --name"),
    (["--name", "sae_x"], "tti: error: --name: 'sae_x' is not a `type: sae` entry of RUN; available: "
                          "sae_k, sae_r, sae_final"),
    (["--name", "sae_k", "--checkpoint", "3"], "tti: error: --checkpoint: '3' not found in"),
])
def test_errors_exit_2_and_write_nothing(run, tmp_path, capsys, args, message):
    before = _tree(run["run"])
    out = tmp_path / "never"
    code, text = _export(capsys, str(run["run"]), "--out", str(out), *args)
    assert code == 2
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), text
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert _tree(run["run"]) == before


def test_site_without_a_transformer_lens_hook_refused(run, tmp_path, capsys):
    """The run as if sae_final had read the stochastic bottleneck's output (a site
    TransformerLens has no hook for): the checkpoint holds its state, the export refuses it."""
    import shutil

    import yaml

    copy = tmp_path / "bottleneck_run"
    shutil.copytree(run["run"], copy, ignore=shutil.ignore_patterns("tb", "metrics.parquet"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"]["bottleneck_layer"] = 1
    for entry in config["regularizers"]:
        if entry["name"] == "sae_final":
            entry["hookpoints"] = ["blocks.1.bottleneck.out"]
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    before = _tree(copy)
    out = tmp_path / "never"
    code, text = _export(capsys, str(copy), "--out", str(out), "--name", "sae_final")
    assert code == 2
    assert text.strip() == ("tti: error: site: blocks.1.bottleneck.out has no TransformerLens hook (TransformerLens "
                            "has no stochastic bottleneck); exportable sites: embed, final_norm, blocks.{i}.resid_pre, "
                            "blocks.{i}.attn.z, blocks.{i}.attn.out, blocks.{i}.resid_mid, blocks.{i}.mlp.pre, "
                            "blocks.{i}.mlp.act, blocks.{i}.mlp.out, blocks.{i}.resid_post")
    assert not out.exists() and _tree(copy) == before


def test_existing_out_refused(run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, text = _export(capsys, str(run["fit"]), "--out", str(out))
    assert code == 2
    assert text.strip().splitlines() == [f"tti: error: --out: '{out}' already exists; give a new directory"]
    assert _tree(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert list(tmp_path.iterdir()) == [out]


def test_fit_dir_refuses_run_options(run, tmp_path, capsys):
    code, text = _export(capsys, str(run["fit"]), "--out", str(tmp_path / "x"), "--name", "sae_k")
    assert code == 2 and text.strip() == ("tti: error: --name: 'sae_k' applies to a run directory; "
                                          f"'{run['fit']}' is a tti sae fit output directory (one SAE, fitted on "
                                          "one checkpoint)")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------- SAELens + TransformerLens end to end
# The run exported with `tti export --format hf` (GPT-2) and opened with TransformerLens 3's
# route for a local HF model, TransformerBridge.boot_transformers (through SAELens's subclass
# SAETransformerBridge, which adds run_with_saes), as loaded: no compatibility mode, whose
# weight processing centres the residual stream an SAE reads.

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def bridge(run):
    from sae_lens.analysis.sae_transformer_bridge import SAETransformerBridge
    from transformer_lens.model_bridge import TransformerBridge

    from tti_dist.cli import main as cli_main
    from tti_dist.utils.environ import environ_set

    hf_dir = run["run"].parent / "hf"
    assert cli_main(["export", str(run["run"]), "--format", "hf", "--out", str(hf_dir)]) == 0
    with environ_set(OFFLINE):
        # run_with_cache and run_with_hooks take TL's hook names (aliases) on the plain bridge;
        # SAETransformerBridge (sae-lens 6.54) leaves the aliases out of its cache and ignores
        # fwd_hooks named by them, so it is used for run_with_saes only.
        return {"plain": TransformerBridge.boot_transformers(str(hf_dir), device="cpu"),
                "sae": SAETransformerBridge.boot_transformers(str(hf_dir), device="cpu")}


def test_hook_table_reads_the_same_activations(run, reference, bridge):
    """Every site the table maps reads, in TransformerLens, what tti's hookpoint reads."""
    from tti_dist.errors import ConfigError
    from tti_dist.sae.saelens_format import transformer_lens_hook

    with torch.no_grad():
        _, cache = bridge["plain"].run_with_cache(reference["batches"][0][:, :-1])
    compared, refused = {}, []
    for site, ours in reference["sites"].items():
        try:
            hook, _ = transformer_lens_hook(site, run["cfg"].model)
        except ConfigError:
            refused.append(site)
            continue
        theirs = cache[hook].reshape(ours.shape)  # hook_z: [.., heads, d_head] -> tti's [.., heads * d_head]
        compared[site] = (theirs - ours).abs().max().item() / max(1.0, ours.abs().max().item())
    print("max relative |TL hook - tti site|:", {k: f"{v:.2g}" for k, v in compared.items()})
    assert refused == ["tokens"]
    assert len(compared) == 1 + 2 * 8 + 1 and max(compared.values()) <= 1e-5


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> float:
    logp = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1))
    return -logp.double().sum().item()


def _resid_mid_splice(bridge, inputs: torch.Tensor, block: int, sae) -> torch.Tensor:
    """Logits with the residual stream after block `block`'s attention replaced by the SAE's
    reconstruction, on TransformerBridge. Its blocks.{i}.hook_resid_mid is the input of ln2,
    the MLP branch alone (HF's GPT-2 block has no hook on the stream both the MLP and the skip
    connection read), so the stream is spliced at the attention output instead:
    attn_out' = SAE(resid_pre + attn_out) - resid_pre."""
    saved = {}

    def keep(act, hook):
        saved["resid_pre"] = act
        return act

    def splice(act, hook):
        return sae(saved["resid_pre"] + act) - saved["resid_pre"]

    return bridge.run_with_hooks(inputs, fwd_hooks=[(f"blocks.{block}.hook_resid_pre", keep),
                                                    (f"blocks.{block}.hook_attn_out", splice)])


@pytest.mark.parametrize("key, args, site", [
    ("fit", [], FIT_SITE),
    ("sae_k", ["--name", "sae_k"], TOPK_SITE),
    ("sae_r", ["--name", "sae_r"], RELU_SITE),
    ("sae_final", ["--name", "sae_final"], "final_norm"),
])
def test_spliced_ce_equals_tti_splice_metric(run, reference, bridge, tmp_path, capsys, key, args, site):
    """SAELens splices the exported SAE into the TransformerLens model at its hook name; the
    next-token CE over the validation batches tti's splice metric used must equal tti's
    ce_clean / ce_spliced (tti_dist.sae.splice): from sae_metrics.json for the fit, from the
    run's eval-step metrics for a co-trained SAE. At resid_mid the bridge's hook feeds the MLP
    branch only, so run_with_saes there is another intervention; the residual-stream splice
    is done by hand (`_resid_mid_splice`)."""
    import pyarrow.parquet as pq
    from sae_lens import SAE

    code, text = _export(capsys, str(run["fit"] if key == "fit" else run["run"]), "--out", str(tmp_path / "s"), *args)
    assert code == 0, text
    sae = SAE.load_from_disk(tmp_path / "s")
    mid = site.endswith("resid_mid")
    clean = with_saes = spliced = hooked = 0.0
    n = 0
    for batch in reference["batches"]:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            clean += _ce(bridge["plain"](inputs), targets)
            logits = bridge["sae"].run_with_saes(inputs, saes=[sae])
            with_saes += _ce(logits, targets)
            by_hand = bridge["plain"].run_with_hooks(inputs, fwd_hooks=[(sae.cfg.metadata.hook_name,
                                                                         lambda act, hook: sae(act))])
            if mid:
                spliced += _ce(_resid_mid_splice(bridge["plain"], inputs, int(site.split(".")[1]), sae), targets)
        hooked = max(hooked, (by_hand - logits).abs().max().item())
        n += targets.numel()
    clean, with_saes = clean / n, with_saes / n
    spliced = spliced / n if mid else with_saes
    if key == "fit":
        metrics = json.loads((run["fit"] / "sae_metrics.json").read_text())["metrics"]
        tti = {m: metrics[f"sae/{site}/{m}"] for m in ("ce_clean", "ce_spliced", "num_tokens")}
    else:
        table = pq.read_table(run["run"] / "metrics.parquet")
        tti = {m: [v for v in table.column(f"sae/{site}/{m}").to_pylist() if v is not None][-1]
               for m in ("ce_clean", "ce_spliced", "num_tokens")}
    print(f"{key}: TL CE clean {clean:.6f}, run_with_saes {with_saes:.6f}, residual splice {spliced:.6f}; tti "
          f"{tti['ce_clean']:.6f} / {tti['ce_spliced']:.6f}; |diff| {abs(spliced - tti['ce_spliced']):.2g}; "
          f"max |run_with_hooks - run_with_saes| logits {hooked:.2g}")
    assert n == tti["num_tokens"]
    assert abs(clean - tti["ce_clean"]) <= 1e-4
    assert abs(spliced - tti["ce_spliced"]) <= 1e-4
    assert abs(spliced - clean) > 1e-3  # the splice changes the loss: the comparison is not vacuous
    assert hooked <= 1e-5
    if mid:  # docs/sae.md: the bridge's resid_mid splice is not the residual stream's
        assert abs(with_saes - tti["ce_spliced"]) > 1e-3
