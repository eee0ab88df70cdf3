"""`tti data build|synth|info`: build a dataset from text, generate the synthetic language,
or summarize (and verify) a dataset directory."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from tti_dist.config.load import apply_override
from tti_dist.config.sections import section_from_dict
from tti_dist.data.build import DEFAULT_BUFFER_BYTES, build_dataset
from tti_dist.data.dataset_reader import open_dataset
from tti_dist.data.synthetic_config import FactoredConfig
from tti_dist.data.synthetic_dataset import write_synthetic_dataset
from tti_dist.errors import ConfigError


def main(args: argparse.Namespace) -> int:
    if args.data_command == "build":
        manifest = build_dataset(
            args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            val_fraction=args.val_fraction, text_field=args.text_field, max_bytes=args.max_bytes,
            shard_tokens=args.shard_tokens, overwrite=args.overwrite, eos_token=args.eos_token,
            bpe_sample_bytes=args.bpe_sample_bytes, workers=args.workers,
            buffer_bytes=DEFAULT_BUFFER_BYTES if args.buffer_bytes is None else args.buffer_bytes,
        )
    elif args.data_command == "synth":
        manifest = write_synthetic_dataset(load_synth_config(args.config, args.overrides), args.out,
                                           overwrite=args.overwrite)
    else:
        manifest = open_dataset(args.path, verify=not args.no_verify).manifest
    print(describe_manifest(manifest, getattr(args, "out", None) or args.path))
    return 0


def load_synth_config(path: str | None, overrides: list[str]) -> FactoredConfig:
    """FactoredConfig from an optional YAML file plus --set overrides, strictly typed."""
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


def describe_manifest(manifest: dict, path: str) -> str:
    """A few lines: tokenizer, and per split its tokens, documents and shards."""
    tok = manifest["tokenizer"]
    lines = [f"dataset {path}: tokenizer {tok['name']} (vocab {tok['vocab_size']}, eos {tok['eos_id']})"]
    for split, info in manifest["splits"].items():
        lines.append(f"  {split}: {info['num_tokens']:,} tokens, {info['num_documents']:,} documents, "
                     f"{len(info['shards'])} shard(s)")
    extra = [c for c in manifest.get("columns", {}) if c != "tokens"]
    if extra:
        lines.append(f"  per-token columns: {', '.join(extra)}")
    return "\n".join(lines)
