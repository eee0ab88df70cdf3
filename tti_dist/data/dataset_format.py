"""The on-disk token dataset: Arrow IPC shards, memory-mapped, with a checkable manifest.

Layout::

    DIR/
      manifest.json          format_version, source, build, tokenizer, dtype, columns,
                             shard_tokens, splits: {split: {num_tokens, num_documents,
                             shards: [{file, num_tokens, sha256}]}}
      tokenizer.json | vocab.json   (the tokenizer's file, if it has one)
      train-00000.arrow ...  one Arrow IPC *file* per shard, one record batch, one row per
                             token: column `tokens` (uint16 when vocab_size <= 65536, else
                             uint32), then optional extra integer columns sorted by name
                             (e.g. per-token ground-truth factors, -1 = inactive)
      val-00000.arrow ...

Documents are packed: each document's tokens, then EOS, concatenated. Shards are cut every
`shard_tokens` tokens at the last document boundary before the cut when there is one; a
document longer than a shard spans shards. The manifest is a pure function of the input
(sorted keys, no timestamps, no paths of the temporary directory), so two builds of the same
input give byte-identical manifests; shards and tokenizer files are byte-identical too.

Writing a dataset: `tti_dist.data.dataset_writer`; opening one: `tti_dist.data.dataset_reader`.
"""

from __future__ import annotations

import json

import numpy as np

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENS_COLUMN = "tokens"
UINT16_MAX_VOCAB = 65536

TOKENS_DESCRIPTION = "token ids; documents packed, each followed by eos_id"
"""The manifest's description of the `tokens` column."""


def tokens_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= UINT16_MAX_VOCAB else np.uint32)


def manifest_bytes(manifest: dict) -> bytes:
    """Canonical serialisation: sorted keys, 2-space indent, ASCII, trailing newline."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def column_order(columns: dict) -> list[str]:
    """Column order inside a shard file: `tokens`, then the extra columns sorted by name."""
    return [TOKENS_COLUMN] + sorted(c for c in columns if c != TOKENS_COLUMN)
