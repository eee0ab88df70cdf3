"""The `tti` command line.

    tti train CONFIG [--set k=v ...] [--run-dir RUN] [--nproc N] [--resume]
    tti export RUN --out model.safetensors [--checkpoint STEP|TAG]
    tti data build SOURCE --out DIR [--tokenizer byte|bpe] [--vocab-size N] [...]
    tti data synth factored --out DIR [--config FILE] [--set key=value ...]
    tti data info DIR
    tti sae fit RUN --site SITE --latents N --k K [--checkpoint STEP] [--steps S] [--lr LR] [--out DIR] [--seed S] [--nproc P]
    tti toy CONFIG --run-dir RUN [--set key=value ...] [--overwrite]
    tti eval RUN [--checkpoint STEP] [--data DIR ...] [--weights FILE] [--nproc P] [--batches B] [--max-tokens N]
    tti inspect RUN --site SITE --unit U [--top N] [--checkpoint STEP] [--batches B] [--context C] [--sae DIR]

User errors (bad config, bad paths, layout mismatches) print one line, `tti: error: ...`,
with no traceback, and exit with code 2 before any process group starts.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from tti_dist.config.schema import DataConfig
from tti_dist.errors import ConfigError

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
    build.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte")
    build.add_argument("--vocab-size", type=int, help="BPE vocabulary size (required with --tokenizer bpe)")
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

    info = data.add_parser("info", help="summarize a dataset (and verify its shards)")
    info.add_argument("path", help="dataset directory")
    info.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the shards")
    return parser


def prepare_train(args: argparse.Namespace):
    """Load, override and validate the config and check the run directory (no processes yet)."""
    from tti_dist.config import ignored_settings, load_config, validate_config
    from tti_dist.train import checkpoint as ckpt

    cfg = load_config(args.config, args.overrides)
    nproc = args.nproc if args.nproc is not None else cfg.parallel.world_size
    if nproc < 1:
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
    ckpt_dir = run_dir / "checkpoints"
    has_checkpoint = ckpt.latest_tag(ckpt_dir) is not None
    if args.resume:
        if not has_checkpoint:
            raise ConfigError(f"--resume: '{run_dir}' holds no complete checkpoint to resume from")
        _check_resume_compatible(cfg, run_dir)
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
    """Build or open and verify the dataset (the resolved config names it), and check that
    both splits hold a whole global micro-batch, so such problems are one-line errors here,
    not a traceback from every rank."""
    from tti_dist.data.loader import DistributedBatchLoader
    from tti_dist.data.prepare import resolve_dataset, run_windows

    cfg, dataset = resolve_dataset(cfg, run_dir)
    windows = run_windows(cfg, dataset)
    for split in ("train", "val"):
        DistributedBatchLoader(windows, split, cfg.train.micro_batch_size, 0, cfg.parallel.dp_size, cfg.train.seed)
    return cfg


def _check_resume_compatible(cfg, run_dir: Path) -> None:
    """The model, layout and ZeRO stage must match the checkpointed run's."""
    import yaml

    from tti_dist.config import config_from_dict, config_to_dict

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


def cmd_train(args: argparse.Namespace) -> int:
    # Validate first: a user error should answer in a second, before megatron and the
    # launcher are imported.
    cfg, run_dir, nproc = prepare_train(args)
    from tti_dist.train.launcher import launch_local
    from tti_dist.train.worker import quiet_dependency_warnings

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    quiet_dependency_warnings()
    logger.info("run directory: %s (%d processes)", run_dir, nproc)
    try:
        results = launch_local(cfg, str(run_dir), nproc, resume=args.resume)
    except ChildFailedError as exc:
        # Each failed rank already printed its traceback; end with one line naming them.
        ranks = ", ".join(str(f.rank) for f in exc.failures.values())
        print(f"tti: training failed on rank(s) {ranks}; see the tracebacks above. "
              f"The last complete checkpoint (if any) is in {run_dir / 'checkpoints'}", file=sys.stderr)
        return EXIT_RUN_FAILED
    result = results[min(results)]
    if result.losses:
        first, last = min(result.losses), max(result.losses)
        print(f"trained to step {result.final_step}: train/task_loss {result.losses[first]:.4f} (step {first}) "
              f"-> {result.losses[last]:.4f} (step {last})")
    if result.eval_losses:
        step = max(result.eval_losses)
        print(f"eval/loss {result.eval_losses[step]:.4f} at step {step}")
    print(f"run directory: {run_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tti_dist.train.export import export_safetensors

    out = export_safetensors(args.run_dir, args.out, args.checkpoint)
    print(f"wrote {out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "build":
        from tti_dist.data.build import build_dataset

        manifest = build_dataset(
            args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            val_fraction=args.val_fraction, text_field=args.text_field, max_bytes=args.max_bytes,
            shard_tokens=args.shard_tokens, overwrite=args.overwrite,
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
        ranks = ", ".join(str(f.rank) for f in exc.failures.values())
        print(f"tti: {what} failed on rank(s) {ranks}; see the tracebacks above", file=sys.stderr)
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


def cmd_toy(args: argparse.Namespace) -> int:
    # Config and run-directory checks come first: one-line errors before anything trains.
    from tti_dist.toy.run import format_summary, prepare_toy, run_toy

    cfg, run_dir = prepare_toy(args.config, args.overrides, args.run_dir, overwrite=args.overwrite)
    summary = run_toy(cfg, run_dir)
    print(format_summary(summary))
    print(f"run directory: {run_dir}")
    return 0


COMMANDS = {"train": cmd_train, "export": cmd_export, "data": cmd_data, "sae": cmd_sae, "eval": cmd_eval,
            "inspect": cmd_inspect, "toy": cmd_toy}


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


if __name__ == "__main__":
    sys.exit(main())
