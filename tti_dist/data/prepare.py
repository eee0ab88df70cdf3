"""Resolve a run's data before any process group starts, and open it in each rank.

`resolve_dataset` runs once, in the launching process: with `data.path` null it builds the
dataset from `data.source` into RUN/dataset (or reuses the one a previous invocation of the
same run built, after checking that it was built with the same settings), verifies it, and
returns a new config whose `data.path` names it, so RUN/config.yaml records exactly what
was trained on and every rank (and a resumed run) opens the same files.
`open_run_data` is what each rank calls to get its windows.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from tti_dist.config.schema import RunConfig
from tti_dist.data.build import build_dataset
from tti_dist.data.dataset_reader import TokenDataset, open_dataset
from tti_dist.data.loader import DatasetWindows, DistributedBatchLoader
from tti_dist.data.sources import sha256_file
from tti_dist.data.synthetic_config import FactoredConfig
from tti_dist.data.synthetic_dataset import write_synthetic_dataset
from tti_dist.errors import ConfigError
from tti_dist.rundir import DATASET_DIR

logger = logging.getLogger(__name__)

RUN_DATASET_DIR = DATASET_DIR
SYNTHETIC_FACTORED = "synthetic:factored"

# Build settings in the manifest that must match the config when RUN/dataset is reused.
_BUILD_KEYS = ("tokenizer", "eos_token", "bpe_sample_bytes", "val_fraction", "text_field", "max_bytes")


def _build_settings(cfg: RunConfig) -> dict:
    d = cfg.data
    return {
        "source": d.source, "tokenizer": d.tokenizer, "val_fraction": d.val_fraction,
        "text_field": d.text_field, "max_bytes": d.max_bytes, "eos_token": d.eos_token,
        "bpe_sample_bytes": d.bpe_sample_bytes if d.tokenizer == "bpe" else None,
        "vocab_size": cfg.model.vocab_size if d.tokenizer == "bpe" else None,
    }


def _check_reused(cfg: RunConfig, manifest: dict, where: Path) -> None:
    synthetic = manifest.get("source", {}).get("kind", "").startswith("synthetic")
    if synthetic != (cfg.data.source == SYNTHETIC_FACTORED):
        raise ConfigError(
            f"data.source: {cfg.data.source!r} differs from the source {where} was built from; "
            "use a new --run-dir or set data.path"
        )
    built = manifest.get("build", {})
    wanted = _build_settings(cfg)
    for key in _BUILD_KEYS + ("vocab_size",):
        if key in built and built[key] != wanted[key]:
            raise ConfigError(
                f"data.{key if key != 'vocab_size' else 'tokenizer'}: {wanted[key]!r} differs from the "
                f"{built[key]!r} that {where} was built with; use a new --run-dir or set data.path"
            )
    tokenizer_file = Path(cfg.data.tokenizer)
    if cfg.data.tokenizer.endswith(".json") and tokenizer_file.is_file():
        # The same path may hold another file now; the dataset's copy is what it was built with.
        recorded = manifest.get("tokenizer", {}).get("sha256")
        if sha256_file(tokenizer_file) != recorded:
            raise ConfigError(
                f"data.tokenizer: {cfg.data.tokenizer!r} is not the file {where} was built with (sha256 "
                f"{recorded}); use a new --run-dir or set data.path"
            )


def resolve_dataset(cfg: RunConfig, run_dir: str | Path) -> tuple[RunConfig, TokenDataset]:
    """The config with `data.path` set to a built, verified dataset, and that dataset.

    `data.source: synthetic:factored` generates the synthetic factored language (default
    generator settings) instead of reading text.
    """
    if cfg.data.path is None:
        out = Path(run_dir) / RUN_DATASET_DIR
        if (out / "manifest.json").is_file():
            dataset = open_dataset(out, verify=cfg.data.verify)
            _check_reused(cfg, dataset.manifest, out)
        elif cfg.data.source == SYNTHETIC_FACTORED:
            # The default generator settings (docs/data.md); to change them, generate with
            # `tti data synth factored --set ...` and point data.path at the result.
            logger.info("generating the synthetic factored corpus into %s", out)
            write_synthetic_dataset(FactoredConfig(), out)
            dataset = open_dataset(out, verify=False)
        else:
            settings = _build_settings(cfg)
            logger.info("building dataset from %r into %s", cfg.data.source, out)
            build_dataset(
                cfg.data.source, out, tokenizer=cfg.data.tokenizer, vocab_size=settings["vocab_size"],
                val_fraction=cfg.data.val_fraction, text_field=cfg.data.text_field,
                max_bytes=cfg.data.max_bytes, eos_token=cfg.data.eos_token,
                bpe_sample_bytes=cfg.data.bpe_sample_bytes,
            )
            dataset = open_dataset(out, verify=False)  # just written and hashed
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(out)))
    else:
        dataset = open_dataset(cfg.data.path, verify=cfg.data.verify)
    if dataset.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the dataset's vocabulary of "
            f"{dataset.vocab_size} tokens ({cfg.data.path}); set model.vocab_size: {dataset.vocab_size}"
        )
    return cfg, dataset


def run_windows(cfg: RunConfig, dataset: TokenDataset | None = None) -> DatasetWindows:
    """Windows over both splits of the run's dataset (`data.path` must be resolved)."""
    if dataset is None:
        if cfg.data.path is None:
            raise ValueError("data.path is not resolved; call resolve_dataset in the launching process")
        # The launching process verified the shards; ranks only map them.
        dataset = open_dataset(cfg.data.path, verify=False)
    return DatasetWindows({split: dataset.split_shards(split) for split in ("train", "val")}, cfg.data.seq_len)


def prepare_run_data(cfg: RunConfig, home: str | Path) -> RunConfig:
    """Build or open and verify the run's dataset (into HOME/dataset unless data.path names
    one) and check that both splits hold a whole global micro-batch: such problems are
    one-line ConfigErrors before launch, not a traceback from every rank. Returns the config
    with data.path resolved."""
    cfg, dataset = resolve_dataset(cfg, home)
    windows = run_windows(cfg, dataset)
    for split in ("train", "val"):
        DistributedBatchLoader(windows, split, cfg.train.micro_batch_size, 0, cfg.parallel.dp_size, cfg.train.seed)
    return cfg
