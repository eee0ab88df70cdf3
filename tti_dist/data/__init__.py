"""Training data: sources, tokenizers, Arrow datasets, the synthetic factored language,
toy-model data, and an exact, resumable per-rank loader (docs/data.md).

The names below are imported on first use (PEP 562), so importing one submodule (e.g.
`tti_dist.data.tokenizer` in a dataset build's tokenizing worker) does not import the loader
and with it torch, which would add about 200 MB to every such process.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TokenDataset": "dataset_reader", "open_dataset": "dataset_reader", "write_dataset": "dataset_writer",
    "build_dataset": "build",
    "DatasetWindows": "loader", "DistributedBatchLoader": "loader", "TokenWindows": "loader",
    "BYTE_VOCAB_SIZE": "tokenizer", "EOS_TOKEN": "tokenizer", "decode_tokens": "tokenizer",
    "load_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
