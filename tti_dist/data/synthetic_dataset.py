"""Writing the synthetic language's train and val splits as a tti_dist Arrow dataset."""

from __future__ import annotations

import json
from pathlib import Path

from tti_dist.data.dataset_writer import write_dataset
from tti_dist.data.synthetic import generate_splits
from tti_dist.data.synthetic_config import FactoredConfig, split_sizes
from tti_dist.data.synthetic_entropy import entropy_bounds
from tti_dist.data.synthetic_factors import COLUMN_DESCRIPTIONS, factor_specs
from tti_dist.data.synthetic_vocab import eos_id, vocabulary
from tti_dist.data.tokenizer import SyntheticTokenizer

SOURCE_KIND = "synthetic/factored"
"""The dataset manifest's `source.kind` for datasets written by `write_synthetic_dataset`."""


def write_synthetic_dataset(cfg: FactoredConfig, out_dir: str | Path, *, overwrite: bool = False) -> dict:
    """Generate `cfg`'s train and val splits and write them as a tti_dist Arrow dataset.

    Splits are by whole document (`split_sizes`), each from its own generator derived from
    `cfg.seed` (`split_rngs`), so the same config writes byte-identical files. The manifest's
    `source` records the kind "synthetic/factored", the config and the factor specifications.
    Returns what `dataset_writer.write_dataset` returns (the manifest).
    """
    cfg.validate()
    splits = generate_splits(cfg)
    sizes = split_sizes(cfg)
    bounds = entropy_bounds(cfg)
    source = {
        "kind": SOURCE_KIND,
        "config": cfg.to_dict(),
        # Through JSON so every value is a plain float/str/list (stable manifest bytes).
        "factors": json.loads(json.dumps(factor_specs(cfg))),
        "entropy_nats_per_token": {
            "entropy_rate": bounds.entropy_rate,
            "oracle_entropy_rate": bounds.oracle_entropy_rate,
            "unigram_entropy": bounds.unigram_entropy,
            "uniform_entropy": bounds.uniform_entropy,
        },
    }
    return write_dataset(
        out_dir,
        splits=splits,
        tokenizer=SyntheticTokenizer(vocabulary(cfg), eos_id(cfg)),
        source=source,
        num_documents=sizes,
        column_descriptions={k: v for k, v in COLUMN_DESCRIPTIONS.items() if k != "tokens"},
        overwrite=overwrite,
    )
