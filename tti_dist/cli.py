"""The `tti` command line.

    tti train CONFIG [--set k=v ...] [--run-dir RUN] [--nproc N] [--resume]
    tti export RUN --out model.safetensors [--checkpoint STEP|TAG]

User errors (bad config, bad paths, layout mismatches) print one line, `tti: error: ...`,
with no traceback, and exit with code 2 before any process group starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

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
    return parser


def prepare_train(args: argparse.Namespace):
    """Load, override and validate the config and check the run directory (no processes yet)."""
    from tti_dist.config import load_config, validate_config
    from tti_dist.train import checkpoint as ckpt

    cfg = load_config(args.config, args.overrides)
    nproc = args.nproc if args.nproc is not None else cfg.parallel.world_size
    if nproc < 1:
        raise ConfigError(f"--nproc: {nproc} must be >= 1")
    validate_config(cfg, world_size=nproc)
    _check_data(cfg)

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
    return cfg, run_dir, nproc


def _check_data(cfg) -> None:
    """Read the data source once (about a second) so that an empty source or splits too
    small for the batch are one-line errors here, not a traceback from every rank."""
    from tti_dist.data import DistributedBatchLoader, TokenWindows, encode_documents, read_text_source

    tokens = encode_documents(read_text_source(cfg.data.source, cfg.data.max_bytes))
    windows = TokenWindows(tokens, cfg.data.seq_len, cfg.data.val_fraction)
    for split in ("train", "val"):
        DistributedBatchLoader(windows, split, cfg.train.micro_batch_size, 0, cfg.parallel.dp_size, cfg.train.seed)


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


COMMANDS = {"train": cmd_train, "export": cmd_export}


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
