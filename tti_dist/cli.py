"""The `tti` command line.

    tti train CONFIG [--set k=v ...] [--run-dir RUN] [--nproc N] [--resume]
    tti export RUN --out model.safetensors [--checkpoint STEP|TAG]
    tti data build SOURCE --out DIR [--tokenizer byte|bpe|FILE.json] [--vocab-size N] [--workers N] [...]
    tti data synth factored --out DIR [--config FILE] [--set key=value ...]
    tti data info DIR
    tti sae fit RUN --site SITE --latents N --k K [--checkpoint STEP] [--steps S] [--lr LR] [--out DIR] [--seed S] [--nproc P]
    tti sweep SWEEP [--address ADDR] [--out DIR] [--set k=v ...]
    tti toy CONFIG --run-dir RUN [--set key=value ...] [--overwrite]
    tti eval RUN [--checkpoint STEP] [--data DIR ...] [--weights FILE] [--nproc P] [--batches B] [--max-tokens N]
    tti inspect RUN --site SITE --unit U [--top N] [--checkpoint STEP] [--batches B] [--context C] [--sae DIR]
    tti tensorboard DIR [--port P] [--host 127.0.0.1]
    tti report DIR [--metric TAG ...] [--target VALUE]
    tti submit CONFIG_OR_SWEEP --address http://HEAD:8265 [--out DIR] [--set k=v ...] [--working-dir DIR] [--runtime-env FILE] [--wait]
    tti jobs status|stop JOB --address http://HEAD:8265
    tti jobs logs JOB --address http://HEAD:8265 [--follow]

User errors (bad config, bad paths, layout mismatches) print one line, `tti: error: ...`,
with no traceback, and exit with code 2 before any process group starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from tti_dist.config.schema import DataConfig
from tti_dist.errors import ConfigError, RunWriteError

logger = logging.getLogger("tti_dist.cli")

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tti", description="Distributed training-time interpretability.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model on this machine (N local ranks)")
    train.add_argument("config", help="YAML run config (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.steps=20 (repeatable)")
    train.add_argument("--run-dir", help="output directory (default: runs/<config name>-<time>)")
    train.add_argument("--nproc", type=int, help="local processes (default: parallel.tp_size * parallel.dp_size)")
    train.add_argument("--resume", action="store_true", help="continue RUN from its latest checkpoint")

    export = sub.add_parser("export", help="write consolidated weights (TP shards merged) as safetensors")
    export.add_argument("run_dir", metavar="RUN", help="run directory written by tti train")
    export.add_argument("--out", required=True, help="output .safetensors file")
    export.add_argument("--checkpoint", help="step or tag (default: latest)")

    data = sub.add_parser("data", help="build and inspect datasets").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="tokenize a text source into an Arrow dataset")
    build.add_argument("source", help="'stdlib', a text file, a directory, a .jsonl, .parquet or .arrow file")
    build.add_argument("--out", required=True, help="dataset directory to create")
    build.add_argument("--tokenizer", default="byte", metavar="byte|bpe|FILE.json",
                       help="byte (257 ids), bpe (trained on a sample of the train split), or a HuggingFace "
                            "tokenizers .json file used as is (default byte)")
    build.add_argument("--vocab-size", type=int, help="BPE vocabulary size (required with --tokenizer bpe)")
    build.add_argument("--eos-token", metavar="TEXT",
                       help="end-of-document token of a --tokenizer .json file (default: the first of "
                            "<|endoftext|>, <|end_of_text|>, </s>, <eos>, <|eos|> among its special tokens)")
    build.add_argument("--bpe-sample-bytes", type=int, default=DataConfig.bpe_sample_bytes,
                       help="bytes of train text BPE is trained on, the first in source order "
                            f"(default {DataConfig.bpe_sample_bytes:,}, as data.bpe_sample_bytes)")
    build.add_argument("--workers", type=int, default=1,
                       help="tokenizing processes (default 1: tokenize in this process); the dataset is "
                            "byte-identical for any number")
    build.add_argument("--buffer-bytes", type=int,
                       help="document text read ahead of the shard writer, the build's memory bound besides "
                            "two shard buffers (default 8 MiB)")
    build.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction,
                       help=f"share of documents held out (default {DataConfig.val_fraction}, as data.val_fraction)")
    build.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text")
    build.add_argument("--max-bytes", type=int, help="read at most this many bytes of the source")
    build.add_argument("--shard-tokens", type=int, default=16_777_216, help="tokens per shard file")
    build.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")

    synth = data.add_parser("synth", help="generate a synthetic corpus with ground-truth factors")
    synth.add_argument("kind", choices=["factored"], help="generative process (see docs/data.md)")
    synth.add_argument("--out", required=True, help="dataset directory to create")
    synth.add_argument("--config", help="YAML file with generator settings (see docs/data.md)")
    synth.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a generator setting, e.g. --set num_documents=2000 (repeatable)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")

    sae = sub.add_parser("sae", help="sparse autoencoders on a trained run").add_subparsers(
        dest="sae_command", required=True)
    fit = sae.add_parser("fit", help="train a TopK SAE on a run's frozen activations and write its splice metrics")
    fit.add_argument("run_dir", metavar="RUN", help="run directory written by tti train")
    fit.add_argument("--site", required=True, help="replicated hookpoint, e.g. blocks.1.resid_post")
    fit.add_argument("--latents", type=int, required=True, help="SAE latents (divisible by the run's tp_size)")
    fit.add_argument("--k", type=int, required=True, help="active latents per token (TopK), 1..latents")
    fit.add_argument("--checkpoint", help="step or tag (default: latest)")
    fit.add_argument("--steps", type=int, default=500, help="SAE optimizer steps (default 500)")
    fit.add_argument("--lr", type=float, default=1e-3, help="SAE Adam learning rate (default 1e-3)")
    fit.add_argument("--out", help="output directory (default: RUN/sae_fit/<site>-n<N>-k<K>)")
    fit.add_argument("--seed", type=int, default=0, help="SAE initialisation seed (default 0)")
    fit.add_argument("--nproc", type=int, help="local processes (default: the run's world size; a multiple of tp_size)")

    ev = sub.add_parser("eval", help="score a checkpoint: capability and interpretability metrics")
    ev.add_argument("run_dir", metavar="RUN", help="run directory written by tti train")
    ev.add_argument("--checkpoint", help="step or tag (default: latest)")
    ev.add_argument("--data", action="append", default=[], metavar="DIR",
                    help="another dataset directory to report loss/perplexity on (repeatable)")
    ev.add_argument("--weights", help="evaluate an exported .safetensors (tti export) instead of a checkpoint")
    ev.add_argument("--nproc", type=int, help="ranks (default: the run's tp_size; 1 with --weights)")
    ev.add_argument("--batches", type=int,
                    help="validation micro-batches per dataset (default: the run's train.eval_batches x dp_size, "
                         "the windows its eval read)")
    ev.add_argument("--max-tokens", type=int, default=4096,
                    help="tokens whose activations feed the interpretability metrics (default 4096)")

    insp = sub.add_parser("inspect", help="top-activating contexts of a unit or SAE latent")
    insp.add_argument("run_dir", metavar="RUN", help="run directory written by tti train")
    insp.add_argument("--site", required=True, help="hookpoint, e.g. blocks.1.mlp.act")
    insp.add_argument("--unit", type=int, required=True, help="unit (or SAE latent) index over the whole width")
    insp.add_argument("--top", type=int, default=20, help="contexts to show (default 20)")
    insp.add_argument("--checkpoint", help="step or tag (default: latest)")
    insp.add_argument("--batches", type=int, default=8, help="validation micro-batches to search (default 8)")
    insp.add_argument("--context", type=int, default=12, help="tokens of left context (default 12)")
    insp.add_argument("--sae", help="a tti sae fit output directory: inspect its latent --unit instead")

    toy = sub.add_parser("toy", help="Toy Models of Superposition: a sparsity sweep of batched toy models")
    toy.add_argument("config", help="YAML toy config (e.g. configs/toy_superposition.yaml)")
    toy.add_argument("--run-dir", required=True, help="output directory (toy.parquet, summary.json, figures/)")
    toy.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a toy setting, e.g. --set steps=500 or --set topk_hidden=2 (repeatable)")
    toy.add_argument("--overwrite", action="store_true", help="replace the outputs of an existing run directory")

    report = sub.add_parser("report", help="summary table, Pareto frontiers and interpretability tax of a sweep")
    report.add_argument("sweep_dir", metavar="DIR", help="output directory of tti sweep (--out)")
    report.add_argument("--metric", dest="metrics", action="append", default=[], metavar="TAG",
                        help="headline interpretability metric, e.g. interp/blocks.1.mlp.act/l0 (repeatable; "
                             "default: the last block's mlp.act l0_frac, or another width-independent metric; docs/report.md)")
    report.add_argument("--target", type=float, metavar="VALUE",
                        help="interpretability level of the tax, in the metric's units (default: the most "
                             "interpretable level every model size reaches with every seed)")

    tboard = sub.add_parser("tensorboard", help="serve TensorBoard on a sweep, a run or any logdir (loopback)")
    tboard.add_argument("dir", metavar="DIR",
                        help="a tti sweep --out directory (serves DIR/runs), a run directory or any logdir")
    tboard.add_argument("--port", type=int, default=6006, help="TCP port (default 6006; 0 = a free port)")
    tboard.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: reach it from elsewhere with ssh -L)")

    sweep = sub.add_parser("sweep", help="run a sweep (model sizes x settings x seeds) on Ray Tune + Ray Train")
    sweep.add_argument("sweep", metavar="SWEEP", help="sweep YAML (see configs/sweeps/) or a run config (one trial)")
    sweep.add_argument("--address", help="join this Ray cluster ('auto' or HOST:PORT); default: an embedded local Ray")
    sweep.add_argument("--out", help="output directory (default: sweeps/<name>-<time>)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value in every trial, e.g. --set train.steps=20 (repeatable)")

    info = data.add_parser("info", help="summarize a dataset (and verify its shards)")
    info.add_argument("path", help="dataset directory")
    info.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the shards")
    addr_help = ("the cluster's Ray dashboard (Jobs API) address, http://HEAD:8265 or HEAD:8265 "
                 "(default: $RAY_API_SERVER_ADDRESS)")
    submit = sub.add_parser("submit", help="run a sweep or run config on a Ray cluster as a Ray Job")
    submit.add_argument("config", metavar="CONFIG_OR_SWEEP", help="sweep YAML (has `axes`) or run config")
    submit.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"), help=addr_help)
    submit.add_argument("--out", help="sweep output directory on the cluster (default: sweeps/<stem>-<time> inside "
                                      "the job's working directory, deleted eventually; pass an absolute path on "
                                      "shared storage)")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in every trial (repeatable)")
    submit.add_argument("--working-dir", help="directory shipped to the cluster; must contain the file "
                                              "(default: the current directory)")
    submit.add_argument("--runtime-env", metavar="FILE",
                        help="YAML mapping merged over the job's runtime_env (e.g. cluster/runtime_env.yaml)")
    submit.add_argument("--wait", action="store_true",
                        help="follow the job's output until it ends; exit 0 when it succeeded, 1 otherwise")

    jobs = sub.add_parser("jobs", help="status, output and stopping of jobs started by tti submit").add_subparsers(
        dest="jobs_command", required=True)
    for name, text in (("status", "the job's status"), ("logs", "the job's output"), ("stop", "stop the job")):
        cmd = jobs.add_parser(name, help=text)
        cmd.add_argument("job_id", metavar="JOB", help="job id printed by tti submit")
        cmd.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"), help=addr_help)
        if name == "logs":
            cmd.add_argument("--follow", action="store_true", help="keep printing output until the job ends")
    return parser


def prepare_train(args: argparse.Namespace):
    """Load, override and validate the config and check the run directory (no processes yet)."""
    from tti_dist.config import ignored_settings, load_config, validate_config
    from tti_dist.train import checkpoint as ckpt

    cfg = load_config(args.config, args.overrides)
    nproc = args.nproc if args.nproc is not None else cfg.parallel.world_size
    # Only a given --nproc is checked here; a bad default (tp_size * dp_size) is reported by
    # validation as the parallel.* field it comes from.
    if args.nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc: {nproc} must be >= 1")
    validate_config(cfg, world_size=nproc)
    for note in ignored_settings(cfg):  # on the user's config, before data.path is resolved
        logger.warning(note)

    if args.run_dir:
        run_dir = Path(args.run_dir)
    elif args.resume:
        raise ConfigError("--resume: needs --run-dir naming the run to continue")
    else:
        run_dir = Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir: '{run_dir}' is a file, not a directory; name a new or existing run directory")
    ckpt_dir = run_dir / "checkpoints"
    has_checkpoint = ckpt.latest_tag(ckpt_dir) is not None
    if args.resume:
        if not has_checkpoint:
            raise ConfigError(f"--resume: '{run_dir}' holds no complete checkpoint to resume from")
        _check_resume_compatible(cfg, run_dir)
        # Every rank's RNG file is read here first, so a refused one is one line before
        # launch rather than a traceback from the rank that reads it.
        tag_dir = ckpt_dir / ckpt.latest_tag(ckpt_dir)
        for rank in range(nproc):
            ckpt.read_rng_state(tag_dir, rank)
    elif has_checkpoint:
        raise ConfigError(
            f"--run-dir: '{run_dir}' already holds checkpoints; pass --resume to continue it or choose another directory"
        )
    created = not run_dir.exists()
    try:
        cfg = _prepare_data(cfg, run_dir)
    except ConfigError:
        if created:  # bad input leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return cfg, run_dir, nproc


def _prepare_data(cfg, run_dir: Path):
    from tti_dist.data.prepare import prepare_run_data

    return prepare_run_data(cfg, run_dir)


def _check_resume_compatible(cfg, run_dir: Path) -> None:
    """The model, layout and ZeRO stage must match the checkpointed run's."""
    import json

    import yaml

    from tti_dist.config import config_from_dict, config_to_dict
    from tti_dist.distributed.zero_config import engine_zero_stage

    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    saved = config_from_dict(yaml.safe_load(saved_file.read_text()))
    for section in ("model", "parallel"):
        old, new = config_to_dict(getattr(saved, section)), config_to_dict(getattr(cfg, section))
        for key in old:
            if old[key] != new[key]:
                raise ConfigError(
                    f"{section}.{key}: {new[key]!r} differs from the checkpointed run's {old[key]!r}; resume needs the same value"
                )
    if saved.zero.stage != cfg.zero.stage:
        raise ConfigError(
            f"zero.stage: {cfg.zero.stage} differs from the checkpointed run's {saved.zero.stage}; resume needs the same value"
        )
    # The checkpoint files follow the stage DeepSpeed ran, recorded next to them; a run from
    # before stages 1-2 ran as stage 0 at dp_size 1 cannot be read by this engine.
    ds_file = run_dir / "deepspeed_config.json"
    if ds_file.is_file():
        ran = json.loads(ds_file.read_text()).get("zero_optimization", {}).get("stage")
        if ran is not None and ran != engine_zero_stage(cfg):
            raise ConfigError(
                f"zero.stage: this run's checkpoints were written by a ZeRO stage-{ran} engine, and zero.stage "
                f"{cfg.zero.stage} at parallel.dp_size {cfg.parallel.dp_size} runs stage {engine_zero_stage(cfg)}; "
                "resume is not possible across that change: start a new run (tti export keeps the weights)"
            )


def cmd_train(args: argparse.Namespace) -> int:
    # Validate first: a user error should answer in a second, before megatron and the
    # launcher are imported.
    cfg, run_dir, nproc = prepare_train(args)
    from tti_dist.train.launcher import launch_local
    from tti_dist.train.worker import quiet_dependency_warnings

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from tti_dist.train.stop_request import EXIT_STOPPED, signal_name

    quiet_dependency_warnings()
    logger.info("run directory: %s (%d processes)", run_dir, nproc)
    ckpt_dir = run_dir / "checkpoints"
    try:
        results = launch_local(cfg, str(run_dir), nproc, resume=args.resume)
    except ChildFailedError as exc:
        if all(f.exitcode == EXIT_STOPPED for f in exc.failures.values()):
            # The ranks alone were signalled (not this process): each saved and exited so.
            print(f"tti: stopped by a signal to the ranks. {_resume_hint(ckpt_dir)}", file=sys.stderr)
            return EXIT_STOPPED
        # Each rank that raised printed its traceback; end with one line naming the dead.
        print(f"tti: training failed: {describe_failures(exc.failures)}. {_resume_hint(ckpt_dir)}",
              file=sys.stderr)
        return EXIT_RUN_FAILED
    except SignalException as exc:
        # This process was signalled; the agent forwarded the signal and the ranks, which
        # save on it (checkpoint.on_signal), have exited.
        print(f"tti: stopped by {signal_name(exc.sigval)}. {_resume_hint(ckpt_dir)}", file=sys.stderr)
        saved = cfg.checkpoint.on_signal and ckpt_dir.joinpath("latest").is_file()
        return EXIT_STOPPED if saved else EXIT_RUN_FAILED
    result = results[min(results)]
    if result.nonfinite:
        print(f"tti: {result.nonfinite}; no update was applied and the run stopped (train.nonfinite: stop). "
              f"{_resume_hint(ckpt_dir)}", file=sys.stderr)
        return EXIT_RUN_FAILED
    if result.stopped_by:
        print(f"tti: stopped by {result.stopped_by} after step {result.final_step}. {_resume_hint(ckpt_dir)}",
              file=sys.stderr)
        return EXIT_STOPPED
    if result.losses:
        first, last = min(result.losses), max(result.losses)
        print(f"trained to step {result.final_step}: train/task_loss {result.losses[first]:.4f} (step {first}) "
              f"-> {result.losses[last]:.4f} (step {last})")
    if result.eval_losses:
        step = max(result.eval_losses)
        print(f"eval/loss {result.eval_losses[step]:.4f} at step {step}")
    print(f"run directory: {run_dir}")
    return 0


def describe_failures(failures: dict) -> str:
    """'rank 1 (pid 4242) was killed by SIGKILL; rank 0 (pid 4241) exited with code 1' from
    torch elastic's {global rank: ProcessFailure}, ranks killed by a signal first (the
    others usually failed because a peer vanished)."""
    from tti_dist.train.stop_request import signal_name

    def one(rank, failure) -> str:
        code = failure.exitcode
        how = f"was killed by {signal_name(-code)}" if code < 0 else f"exited with code {code}"
        reason = _failure_reason(failure)
        return f"rank {rank} (pid {failure.pid}) {how}" + (f" ({reason})" if reason else "")

    ordered = sorted(failures.items(), key=lambda item: (item[1].exitcode >= 0, item[0]))
    return "; ".join(one(rank, failure) for rank, failure in ordered)


def _failure_reason(failure) -> str:
    """The last line of the exception a failed rank raised ('CollectiveFailure: a collective
    did not complete ...'), from the error file torch elastic's @record wrote; '' if none."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    if not isinstance(message, str) or message.startswith("To enable traceback") or message.startswith("Signal "):
        return ""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _resume_hint(ckpt_dir: Path) -> str:
    from tti_dist.train.checkpoint import latest_tag

    tag = latest_tag(ckpt_dir)
    if tag is None:
        return f"No complete checkpoint in {ckpt_dir}."
    run_dir = ckpt_dir.parent
    return (f"The latest complete checkpoint is {ckpt_dir / tag}; continue with: "
            f"tti train {run_dir / 'config.yaml'} --run-dir {run_dir} --resume")


def cmd_export(args: argparse.Namespace) -> int:
    from tti_dist.train.export import export_safetensors

    out = export_safetensors(args.run_dir, args.out, args.checkpoint)
    print(f"wrote {out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "build":
        from tti_dist.data.build import DEFAULT_BUFFER_BYTES, build_dataset

        manifest = build_dataset(
            args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            val_fraction=args.val_fraction, text_field=args.text_field, max_bytes=args.max_bytes,
            shard_tokens=args.shard_tokens, overwrite=args.overwrite, eos_token=args.eos_token,
            bpe_sample_bytes=args.bpe_sample_bytes, workers=args.workers,
            buffer_bytes=DEFAULT_BUFFER_BYTES if args.buffer_bytes is None else args.buffer_bytes,
        )
    elif args.data_command == "synth":
        from tti_dist.data.synthetic import write_synthetic_dataset

        manifest = write_synthetic_dataset(_load_synth_config(args.config, args.overrides), args.out,
                                           overwrite=args.overwrite)
    else:
        from tti_dist.data.arrow_dataset import open_dataset

        manifest = open_dataset(args.path, verify=not args.no_verify).manifest
    print(_describe_manifest(manifest, getattr(args, "out", None) or args.path))
    return 0


def _load_synth_config(path: str | None, overrides: list[str]):
    """FactoredConfig from an optional YAML file plus --set overrides, strictly typed."""
    import yaml

    from tti_dist.config.load import apply_override, section_from_dict
    from tti_dist.data.synthetic import FactoredConfig

    raw: dict = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"--config: '{path}' does not exist or is not a file")
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"--config: '{path}' must hold a mapping of generator settings")
    for override in overrides:
        apply_override(raw, override)
    cfg = section_from_dict(FactoredConfig, raw, "synth.")
    cfg.validate()
    return cfg


def _describe_manifest(manifest: dict, path: str) -> str:
    tok = manifest["tokenizer"]
    lines = [f"dataset {path}: tokenizer {tok['name']} (vocab {tok['vocab_size']}, eos {tok['eos_id']})"]
    for split, info in manifest["splits"].items():
        lines.append(f"  {split}: {info['num_tokens']:,} tokens, {info['num_documents']:,} documents, "
                     f"{len(info['shards'])} shard(s)")
    extra = [c for c in manifest.get("columns", {}) if c != "tokens"]
    if extra:
        lines.append(f"  per-token columns: {', '.join(extra)}")
    return "\n".join(lines)


def _launch(what: str, fn, *args):
    """Run a multi-rank job; (result, None), or (None, exit code) after one line naming the
    failed ranks (each printed its traceback already)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from tti_dist.train.worker import quiet_dependency_warnings

    quiet_dependency_warnings()
    try:
        return fn(*args), None
    except ChildFailedError as exc:
        print(f"tti: {what} failed: {describe_failures(exc.failures)}", file=sys.stderr)
        return None, EXIT_RUN_FAILED


def cmd_sae(args: argparse.Namespace) -> int:
    from tti_dist.sae.fit import METRICS_FILE, format_table, launch_fit, prepare_fit

    plan = prepare_fit(args.run_dir, args.site, args.latents, args.k, checkpoint=args.checkpoint, steps=args.steps,
                       lr=args.lr, out=args.out, seed=args.seed, nproc=args.nproc)
    results, code = _launch("sae fit", launch_fit, plan)
    if code is not None:
        return code
    result = results[min(results)]
    print(f"SAE on {plan.site} of {plan.run_dir} ({plan.tag}): {plan.sae_cfg.num_latents} latents, "
          f"k={plan.sae_cfg.k}, {plan.steps} steps")
    print(format_table(result["metrics"], plan.site))
    print(f"wrote {Path(plan.out_dir) / METRICS_FILE}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tti_dist.eval.evaluate import launch_eval, prepare_eval

    plan = prepare_eval(args.run_dir, checkpoint=args.checkpoint, data=args.data, weights=args.weights,
                        nproc=args.nproc, batches=args.batches, max_tokens=args.max_tokens)
    results, code = _launch("eval", launch_eval, plan)
    if code is not None:
        return code
    print((Path(plan.out_dir) / f"{plan.out_name}.md").read_text(), end="")
    print(f"wrote {plan.out_dir}/{plan.out_name}.parquet, {plan.out_name}.json, {plan.out_name}.md, summary.md and tb/")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tti_dist.eval.inspect import format_contexts, launch_inspect, prepare_inspect

    plan, settings = prepare_inspect(args.run_dir, args.site, args.unit, top=args.top, checkpoint=args.checkpoint,
                                     batches=args.batches, context=args.context, sae=args.sae)
    contexts, code = _launch("inspect", launch_inspect, plan, settings)
    if code is not None:
        return code
    print(format_contexts(settings, contexts))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    # Everything is checked (sweep keys, every trial's config and dataset) before Ray starts.
    from tti_dist.orchestrate.sweep import load_sweep, preflight, prepare_trials, run_sweep

    sweep = load_sweep(args.sweep, args.overrides)
    out = Path(args.out) if args.out else Path("sweeps") / f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    preflight(sweep, out, args.address)
    specs = prepare_trials(sweep, out)
    print(f"sweep {sweep.name}: {len(specs)} trial(s) -> {out}", flush=True)
    outcome = run_sweep(sweep, specs, args.address, emit=lambda line: print(line, flush=True))
    failed = [name for name, status in outcome.items() if status != "completed"]
    print(f"{len(outcome) - len(failed)}/{len(outcome)} trials completed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    print(f"runs: {out / 'runs'}   report: tti report {out}   TensorBoard: tti tensorboard {out}")
    return EXIT_RUN_FAILED if failed else 0


def cmd_toy(args: argparse.Namespace) -> int:
    # Config and run-directory checks come first: one-line errors before anything trains.
    from tti_dist.toy.run import format_summary, prepare_toy, run_toy

    cfg, run_dir = prepare_toy(args.config, args.overrides, args.run_dir, overwrite=args.overwrite)
    summary = run_toy(cfg, run_dir)
    print(format_summary(summary))
    print(f"run directory: {run_dir}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tti_dist.report.markdown import format_tax
    from tti_dist.report.sweep_report import write_report

    result = write_report(args.sweep_dir, metrics=args.metrics or None, target=args.target)
    for path in [result["summary"], *result["plots"], result["report"]]:
        print(f"wrote {path}")
    if result["taxes"]:
        print(format_tax(result["taxes"]))
    for note in result["notes"]:
        print(f"note: {note}")
    return 0


def cmd_tensorboard(args: argparse.Namespace) -> int:
    from tti_dist.report.tensorboard_server import resolve_logdir, serve_tensorboard

    logdir = resolve_logdir(args.dir)

    def announce(url: str) -> None:
        print(f"TensorBoard serving {logdir} at {url} (Ctrl-C to stop)", flush=True)

    serve_tensorboard(logdir, port=args.port, host=args.host, on_start=announce)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from tti_dist.orchestrate import jobs

    job_id = jobs.submit(args.config, args.address, out=args.out, overrides=args.overrides,
                         working_dir=args.working_dir, runtime_env=args.runtime_env)
    print(job_id, flush=True)
    address = jobs.normalize_address(args.address)
    if not args.wait:
        print(f"follow it with: tti jobs logs {job_id} --address {address} --follow", file=sys.stderr)
        return 0
    return _follow_job(jobs, job_id, address)


def _follow_job(jobs, job_id: str, address: str) -> int:
    cluster = jobs.connect(address)
    try:
        for chunk in jobs.logs(job_id, None, follow=True, cluster=cluster):
            print(chunk, end="", flush=True)
    except KeyboardInterrupt:
        print(f"\ntti: stopped following; the job keeps running (tti jobs stop {job_id} --address {address})",
              file=sys.stderr)
        return 130
    final = jobs.wait_for(job_id, None, cluster=cluster)
    print(f"{job_id}: {final}", file=sys.stderr)
    return 0 if final == "SUCCEEDED" else EXIT_RUN_FAILED


def cmd_jobs(args: argparse.Namespace) -> int:
    from tti_dist.orchestrate import jobs

    if args.jobs_command == "status":
        details = jobs.info(args.job_id, args.address)
        message = f" ({details.message})" if details.message else ""
        print(f"{args.job_id}: {details.status}{message}")
    elif args.jobs_command == "logs":
        if args.follow:
            return _follow_job(jobs, args.job_id, jobs.normalize_address(args.address))
        print(jobs.logs(args.job_id, args.address), end="")
    else:
        cluster = jobs.connect(args.address)
        if jobs.stop(args.job_id, None, cluster=cluster):
            print(f"{args.job_id}: stop requested")
        else:
            print(f"{args.job_id}: not running ({jobs.status(args.job_id, None, cluster=cluster)})")
    return 0


COMMANDS = {"train": cmd_train, "export": cmd_export, "data": cmd_data, "sae": cmd_sae, "eval": cmd_eval,
            "submit": cmd_submit, "jobs": cmd_jobs,
            "tensorboard": cmd_tensorboard,
            "inspect": cmd_inspect, "toy": cmd_toy, "sweep": cmd_sweep, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tti` console script."""
    args = _parser().parse_args(argv)
    from tti_dist.utils.logging import setup_logging

    setup_logging("INFO")
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"tti: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunWriteError as exc:  # a single-process run (more ranks report through the launcher)
        print(f"tti: error: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED


if __name__ == "__main__":
    sys.exit(main())
