"""Build a token dataset from a text source: stream documents, split, tokenize, write shards.

The split is by document and deterministic: document i (named `name`) goes to val iff
`int(sha256(f"{i}:{name}")[:8 bytes]) / 2**64 < val_fraction`. A source too small for any
document to land in val puts its last document there; the stream holds back one document
to know which is last.

Memory does not grow with the corpus. Documents stream from the source through a bounded
buffer (`buffer_bytes` of document text read ahead and not yet written, plus one document)
to the tokenizer, in this process or in `workers` spawned processes; the tokenized batches
come back in source order and go into per-split shard buffers, each written to disk as soon
as it holds `shard_tokens` tokens. The output depends on neither `workers` nor
`buffer_bytes`: the same documents are tokenized by the same function and packed in the
same order.

A BPE tokenizer is trained in a first pass over a deterministic sample: the first
`bpe_sample_bytes` bytes of train documents in source order (the document that crosses the
limit cut at a UTF-8 character boundary), streamed into the trainer without being held. Val
text never shapes the vocabulary, and no document after the sample does. The second pass
tokenizes everything. A pretrained tokenizer (a HuggingFace `tokenizers` JSON file) needs
only the second pass.

The manifest records the build parameters next to the source description, so a dataset says
how to rebuild it; `workers` and `buffer_bytes` are left out, since they do not change it.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import multiprocessing
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tti_dist.data.dataset_writer import DEFAULT_SHARD_TOKENS, DatasetWriter, check_out_dir
from tti_dist.data.encode import (
    EncodedBatch,
    encode_documents,
    encode_in_worker,
    init_worker,
    release_free_memory,
    tokenizer_spec,
)
from tti_dist.data.sources import Document, _Reader, _utf8_prefix
from tti_dist.data.tokenizer import (
    BYTE_VOCAB_SIZE,
    ByteTokenizer,
    Tokenizer,
    check_bpe_vocab_size,
    load_pretrained_tokenizer,
    train_bpe,
)
from tti_dist.errors import ConfigError

logger = logging.getLogger(__name__)

TOKENIZERS = ("byte", "bpe")
"""Built-in tokenizers; `tokenizer` may also be a path to a tokenizer .json file."""

DEFAULT_BUFFER_BYTES = 8 * 1024 * 1024
"""Document text (bytes) read ahead of the shard writer: 8 MiB, eight 1 MiB batches in flight
with two workers; more buys no throughput."""

DEFAULT_BPE_SAMPLE_BYTES = 100_000_000
"""Bytes of train text the BPE trainer reads: 100 MB."""

_MAX_BATCH_BYTES = 1024 * 1024
"""Largest batch of text handed to a worker: small enough to keep every worker busy and the
pipeline short, large enough that the per-task overhead is negligible."""


@dataclass
class BuildStats:
    """What a build held and read, for tests and benchmarks (not in the manifest)."""

    peak_buffered_bytes: int = 0
    """The most document bytes read from the source and not yet in a shard buffer
    (the held-back document, the batch being filled, batches being tokenized)."""
    peak_buffered_documents: int = 0
    """The most documents in that state."""
    peak_shard_buffer_tokens: int = 0
    """The most tokens a split's shard buffer held (at most shard_tokens)."""
    num_batches: int = 0
    """Batches tokenized."""
    tokenizing_pids: set[int] = field(default_factory=set)
    """The processes that tokenized them."""
    bpe_sample_bytes: int = 0
    """Bytes of train text the BPE trainer read (0 for other tokenizers)."""
    bpe_sample_documents: int = 0
    """Documents (the last maybe cut) the BPE trainer read."""


def val_score(index: int, name: str) -> float:
    """Stable pseudo-random number in [0, 1) for document `index` named `name`."""
    key = f"{index}:{name}".encode("utf-8", errors="surrogateescape")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64


def split_stream(docs: Iterable[Document], val_fraction: float) -> Iterator[tuple[Document, bool]]:
    """(document, is_val) in source order; see the module docstring.

    Holds back one document: whether the last document goes to val (because no other did)
    is known only when the source ends.
    """
    held: tuple[int, Document] | None = None
    any_val = False
    for index, doc in enumerate(docs):
        if held is not None:
            is_val = val_score(held[0], held[1].name) < val_fraction
            any_val |= is_val
            yield held[1], is_val
        held = (index, doc)
    if held is not None:
        yield held[1], (not any_val) or val_score(held[0], held[1].name) < val_fraction


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val) documents, each in source order; see the module docstring."""
    train: list[Document] = []
    val: list[Document] = []
    for doc, is_val in split_stream(docs, val_fraction):
        (val if is_val else train).append(doc)
    return train, val


def _is_count(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _validate(tokenizer, vocab_size, val_fraction, shard_tokens, eos_token, bpe_sample_bytes, workers,
              buffer_bytes) -> Tokenizer | None:
    """Check the arguments; return the pretrained tokenizer when `tokenizer` is a file."""
    pretrained = None
    if not isinstance(tokenizer, str) or not (tokenizer in TOKENIZERS or tokenizer.endswith(".json")):
        raise ConfigError(
            f"--tokenizer: {tokenizer!r} is not allowed; use one of {', '.join(TOKENIZERS)}, "
            "or a path to a HuggingFace tokenizer .json file"
        )
    if tokenizer == "byte":
        if vocab_size is not None and vocab_size != BYTE_VOCAB_SIZE:
            raise ConfigError(
                f"--vocab-size: {vocab_size!r} is not allowed with --tokenizer byte, whose vocabulary "
                f"is fixed at {BYTE_VOCAB_SIZE}; omit it or use --tokenizer bpe"
            )
    elif tokenizer == "bpe":
        if vocab_size is None:
            raise ConfigError("--vocab-size: required with --tokenizer bpe (e.g. 8192)")
        check_bpe_vocab_size(vocab_size)
    elif vocab_size is not None:
        raise ConfigError(
            f"--vocab-size: {vocab_size!r} is not allowed with --tokenizer {tokenizer!r}, whose vocabulary "
            "comes from the file; omit it"
        )
    if eos_token is not None and not tokenizer.endswith(".json"):
        raise ConfigError(
            f"--eos-token: {eos_token!r} is not allowed with --tokenizer {tokenizer}, whose end-of-document "
            "token is fixed; use it only with a tokenizer .json file"
        )
    if (isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float))
            or not 0.0 < val_fraction < 1.0):
        raise ConfigError(f"--val-fraction: {val_fraction!r} is not allowed; use a number in (0, 1)")
    if not _is_count(shard_tokens):
        raise ConfigError(f"--shard-tokens: {shard_tokens!r} is not allowed; use a positive number of tokens")
    if not _is_count(bpe_sample_bytes):
        raise ConfigError(f"--bpe-sample-bytes: {bpe_sample_bytes!r} is not allowed; use a positive number of bytes")
    if not _is_count(workers):
        raise ConfigError(f"--workers: {workers!r} is not allowed; use a positive number of processes")
    if not _is_count(buffer_bytes):
        raise ConfigError(f"--buffer-bytes: {buffer_bytes!r} is not allowed; use a positive number of bytes")
    if tokenizer.endswith(".json"):
        pretrained = load_pretrained_tokenizer(tokenizer, eos_token)
    return pretrained


def _train_sample(reader: Iterable[Document], val_fraction: float, sample_bytes: int,
                  stats: BuildStats) -> Iterator[bytes]:
    """The first `sample_bytes` bytes of train documents, in source order (see module docstring)."""
    for doc, is_val in split_stream(reader, val_fraction):
        if is_val:
            continue
        text = _utf8_prefix(doc.text, sample_bytes - stats.bpe_sample_bytes)
        if text:
            stats.bpe_sample_bytes += len(text)
            stats.bpe_sample_documents += 1
            yield text
        if stats.bpe_sample_bytes >= sample_bytes or len(text) < len(doc.text):
            return  # the sample is full; the rest of the source is not read in this pass


class _Pipeline:
    """Batches (document, is_val) pairs, tokenizes them in order, feeds the writer.

    At most `buffer_bytes` of document text (plus the document just read) are held between
    the source and the shard buffers. With one worker, batches are tokenized here; with
    more, by a spawned pool, at most `buffer_bytes` of text in flight, results taken in
    submission order.
    """

    def __init__(self, tok: Tokenizer, writer: DatasetWriter, workers: int, buffer_bytes: int,
                 stats: BuildStats) -> None:
        self.tok = tok
        self.writer = writer
        self.stats = stats
        self.buffer_bytes = buffer_bytes
        self.batch_bytes = max(1, min(_MAX_BATCH_BYTES, buffer_bytes // (4 * workers)))
        self.num_invalid_utf8 = 0
        self._texts: list[bytes] = []
        self._is_val: list[bool] = []
        self._batch_size = 0
        self._held_bytes = 0  # text read and not yet in a shard buffer
        self._held_docs = 0
        self._inflight: collections.deque = collections.deque()  # (Future, bytes, docs), in order
        self._pool: ProcessPoolExecutor | None = None
        if workers > 1:
            # An executor rather than multiprocessing.Pool: if a worker dies (killed for memory),
            # its future raises BrokenProcessPool instead of never completing.
            self._pool = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
                initargs=(tokenizer_spec(tok), writer.dtype.name))

    def read(self, doc: Document) -> None:
        """Account for a document just read from the source (before its split is known)."""
        self._held_bytes += len(doc.text)
        self._held_docs += 1
        self.stats.peak_buffered_bytes = max(self.stats.peak_buffered_bytes, self._held_bytes)
        self.stats.peak_buffered_documents = max(self.stats.peak_buffered_documents, self._held_docs)

    def add(self, doc: Document, is_val: bool) -> None:
        """Queue a document whose split is known; blocks while the buffer is full."""
        self._texts.append(doc.text)
        self._is_val.append(is_val)
        self._batch_size += len(doc.text)
        if self._batch_size >= self.batch_bytes:
            self._submit()
        while self._held_bytes > self.buffer_bytes:
            if self._inflight:
                self._take_oldest()
            elif self._texts:
                self._submit()
            else:
                break  # only the held-back document is left

    def finish(self) -> None:
        if self._texts:
            self._submit()
        while self._inflight:
            self._take_oldest()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def close(self) -> None:
        """Stop the workers (after an error): queued batches are dropped, the at most one
        running per worker finishes."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _submit(self) -> None:
        texts, is_val = self._texts, self._is_val
        size = self._batch_size
        self._texts, self._is_val, self._batch_size = [], [], 0
        self.stats.num_batches += 1
        if self._pool is None:
            self._write(encode_documents(self.tok, self.writer.dtype, texts, is_val), size, len(texts))
            if not isinstance(self.tok, ByteTokenizer):
                release_free_memory()  # see its docstring: the tokenizers library's temporaries
        else:
            self._inflight.append((self._pool.submit(encode_in_worker, texts, is_val), size, len(texts)))

    def _take_oldest(self) -> None:
        result, size, num_docs = self._inflight.popleft()
        self._write(result.result(), size, num_docs)

    def _write(self, batch: EncodedBatch, size: int, num_docs: int) -> None:
        for split, encoded in batch.splits.items():
            if len(encoded.doc_lengths):
                self.writer.append(split, encoded.tokens, encoded.doc_lengths)
        self.num_invalid_utf8 += batch.num_invalid_utf8
        self.stats.tokenizing_pids.add(batch.pid)
        self._held_bytes -= size
        self._held_docs -= num_docs


def build_dataset(
    source: str,
    out_dir: str | Path,
    *,
    tokenizer: str = "byte",
    vocab_size: int | None = None,
    val_fraction: float = 0.01,
    text_field: str = "text",
    max_bytes: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    eos_token: str | None = None,
    bpe_sample_bytes: int = DEFAULT_BPE_SAMPLE_BYTES,
    workers: int = 1,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    stats: BuildStats | None = None,
) -> dict:
    """Build a dataset at `out_dir` from `source` (see `sources.iter_documents`); return its manifest.

    Args:
        source: "stdlib", or a path to a text file, directory, *.jsonl, *.parquet or *.arrow.
        out_dir: dataset directory to create (atomically).
        tokenizer: "byte" (fixed 257-token vocabulary), "bpe" (trained on a sample of the
            train split), or a path to a HuggingFace `tokenizers` .json file (used as is).
        vocab_size: BPE vocabulary size (required for "bpe"; must be omitted or 257 for
            "byte", omitted for a file).
        val_fraction: expected fraction of documents held out for validation, in (0, 1).
        text_field: the text field/column of JSONL/Parquet/Arrow records.
        max_bytes: read at most this many bytes of text; None reads everything.
        shard_tokens: the most tokens per shard file.
        overwrite: replace an existing dataset at `out_dir`.
        eos_token: with a tokenizer file, the text of its end-of-document token; None picks
            the first of `tokenizer.EOS_TOKEN_CANDIDATES` among its special tokens.
        bpe_sample_bytes: bytes of train text the BPE tokenizer is trained on (the first
            ones, in source order); recorded in the manifest.
        workers: tokenizing processes; 1 tokenizes in this process. The output is the same
            for any number.
        buffer_bytes: document text read ahead of the shard writer (memory bound; the output
            is the same for any value).
        stats: filled with what the build held and read, if given.

    Raises:
        ConfigError: a bad argument (naming its flag), an unusable source or tokenizer file,
            `out_dir` not writable, or no document left for training.
    """
    pretrained = _validate(tokenizer, vocab_size, val_fraction, shard_tokens, eos_token, bpe_sample_bytes,
                           workers, buffer_bytes)
    check_out_dir(out_dir, overwrite)  # fail before the expensive part
    stats = stats if stats is not None else BuildStats()
    reader = _Reader(source, text_field, max_bytes)  # checks the source and its settings
    tok: Tokenizer
    if tokenizer == "byte":
        tok = ByteTokenizer()
    elif tokenizer == "bpe":
        # The first pass reads only as far as the sample (and warns nothing: the second pass does).
        sample_reader = _Reader(source, text_field, max_bytes, warn=False)
        tok = train_bpe(_train_sample(sample_reader, val_fraction, bpe_sample_bytes, stats), vocab_size)
        release_free_memory()  # the trainer's word and pair tables, freed on its threads
        if stats.bpe_sample_documents == 0:
            _no_train_document(val_fraction, source, sample_reader.num_documents)
        logger.info("trained BPE (%d tokens) on %d bytes of %d train documents",
                    tok.vocab_size, stats.bpe_sample_bytes, stats.bpe_sample_documents)
    else:
        assert pretrained is not None
        tok = pretrained

    with DatasetWriter(out_dir, tok, shard_tokens=shard_tokens, overwrite=overwrite) as writer:
        pipeline = _Pipeline(tok, writer, workers, buffer_bytes, stats)
        try:
            for doc, is_val in split_stream(_counted(reader, pipeline), val_fraction):
                pipeline.add(doc, is_val)
            pipeline.finish()
        finally:
            pipeline.close()
        stats.peak_shard_buffer_tokens = writer.peak_buffer_tokens
        if writer.num_documents("train") == 0:
            _no_train_document(val_fraction, source, reader.num_documents)
        if pipeline.num_invalid_utf8:
            logger.warning(
                "data.source=%r: %d of %d documents are not valid UTF-8; the %s tokenizer sees "
                "their invalid bytes as U+FFFD, so they do not round-trip exactly",
                source, pipeline.num_invalid_utf8, reader.num_documents, tok.name,
            )
        build = {
            "tokenizer": tokenizer,
            "vocab_size": vocab_size,
            "eos_token": eos_token,
            "bpe_sample_bytes": bpe_sample_bytes if tokenizer == "bpe" else None,
            "val_fraction": val_fraction,
            "text_field": text_field,
            "max_bytes": max_bytes,
            "shard_tokens": shard_tokens,
        }
        return writer.commit(source=reader.describe(), build=build)


def _counted(reader: Iterable[Document], pipeline: _Pipeline) -> Iterator[Document]:
    for doc in reader:
        pipeline.read(doc)
        yield doc


def _no_train_document(val_fraction: float, source: str, num_documents: int) -> None:
    raise ConfigError(
        f"--val-fraction: {val_fraction!r} leaves no document for training "
        f"(data.source {source!r} has {num_documents} document{'s' if num_documents != 1 else ''}); "
        "use a smaller fraction or a source with more documents"
    )
