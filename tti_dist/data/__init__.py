"""Training data: sources, tokenizers, Arrow datasets, the synthetic factored language,
toy-model data, and an exact, resumable per-rank loader (docs/data.md)."""

from tti_dist.data.arrow_dataset import TokenDataset, open_dataset, write_dataset
from tti_dist.data.build import build_dataset
from tti_dist.data.loader import DatasetWindows, DistributedBatchLoader, TokenWindows
from tti_dist.data.tokenizer import BYTE_VOCAB_SIZE, EOS_TOKEN, decode_tokens, load_tokenizer

__all__ = [
    "BYTE_VOCAB_SIZE", "EOS_TOKEN", "DatasetWindows", "DistributedBatchLoader", "TokenDataset",
    "TokenWindows", "build_dataset", "decode_tokens", "load_tokenizer", "open_dataset", "write_dataset",
]
