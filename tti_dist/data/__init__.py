"""Training data: a byte-level corpus over real text and an exact, resumable per-rank loader."""

from tti_dist.data.byte_corpus import (
    BYTE_VOCAB_SIZE,
    EOS_TOKEN,
    STDLIB_SOURCE,
    decode_tokens,
    encode_documents,
    read_text_source,
)
from tti_dist.data.loader import DistributedBatchLoader, TokenWindows

__all__ = [
    "BYTE_VOCAB_SIZE",
    "EOS_TOKEN",
    "STDLIB_SOURCE",
    "DistributedBatchLoader",
    "TokenWindows",
    "decode_tokens",
    "encode_documents",
    "read_text_source",
]
