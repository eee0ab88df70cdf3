"""The dataset layer: sources, tokenizers, the Arrow shard format and build_dataset."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tti_dist.data import arrow_dataset
from tti_dist.data.arrow_dataset import open_dataset, write_dataset
from tti_dist.data.build import build_dataset, split_documents
from tti_dist.data.sources import Document, describe_source, iter_documents
from tti_dist.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    SyntheticTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)
from tti_dist.errors import ConfigError

DOCS = {
    "a.txt": "Hello, world.\nThe quick brown fox jumps over the lazy dog.\n",
    "b/nested.txt": "Ünïcödé text: naïve café, 日本語, emoji \U0001f600.\n" * 3,
    "b/z.md": "# Title\n\nA literal <|endoftext|> inside text stays text.\n",
    "c.py": "def f(x):\n    return x * 2\n\n" * 5,
    "d.txt": "short",
    "e.txt": "the the the and and of of to to in in\n" * 4,
}


def _write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return root


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    return _write_tree(tmp_path / "src", {**DOCS, ".hidden.txt": "secret", ".git/config": "x"})


def _all_tokens(ds, split: str) -> np.ndarray:
    return np.concatenate([s["tokens"] for s in ds.split_shards(split)])


def _split_docs(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    ends = np.flatnonzero(tokens == eos_id)
    assert len(tokens) == 0 or ends[-1] == len(tokens) - 1  # the last document is terminated
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e] for s, e in zip(starts, ends)]


def _expected_split(source: str, val_fraction: float, **kw) -> tuple[list[Document], list[Document]]:
    return split_documents(list(iter_documents(source, **kw)), val_fraction)


# ---------------------------------------------------------------- round trip


def test_byte_build_round_trip(text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    manifest = build_dataset(str(text_dir), out, val_fraction=0.3)
    ds = open_dataset(out)
    train, val = _expected_split(str(text_dir), 0.3)
    assert sorted(d.name for d in train + val) == sorted(DOCS)  # hidden files and dirs skipped
    assert len(val) >= 1 and len(train) >= 1
    assert ds.vocab_size == 257 and ds.eos_id == 256 and ds.column_names == []
    assert json.loads((out / "manifest.json").read_bytes()) == manifest == ds.manifest
    for split, docs in (("train", train), ("val", val)):
        tokens = _all_tokens(ds, split)
        assert tokens.dtype == np.uint16
        assert manifest["splits"][split]["num_tokens"] == len(tokens) == sum(len(d.text) + 1 for d in docs)
        assert sum(len(s["tokens"]) for s in ds.split_shards(split)) == ds.num_tokens(split)
        assert manifest["splits"][split]["num_documents"] == len(docs) == int((tokens == 256).sum())
        decoded = _split_docs(tokens, 256)
        assert [d.astype(np.uint8).tobytes() for d in decoded] == [d.text for d in docs]
        assert [ds.tokenizer.decode(d) for d in decoded] == [d.text.decode() for d in docs]
    assert manifest["build"] == {
        "max_bytes": None, "shard_tokens": 16_777_216, "text_field": "text",
        "tokenizer": "byte", "val_fraction": 0.3, "vocab_size": None,
    }
    assert manifest["tokenizer"] == {
        "eos_id": 256, "file": None, "name": "byte", "sha256": None, "vocab_size": 257,
    }
    assert sorted(os.listdir(out)) == ["manifest.json", "train-00000.arrow", "val-00000.arrow"]
    assert not list(tmp_path.glob("ds.tmp-*"))


def test_bpe_build_round_trip(text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    manifest = build_dataset(str(text_dir), out, tokenizer="bpe", vocab_size=300, val_fraction=0.3)
    ds = open_dataset(out)
    tok = ds.tokenizer
    assert isinstance(tok, BPETokenizer) and isinstance(tok, Tokenizer)
    assert tok.eos_id == 0 and tok.vocab_size == 300 == manifest["tokenizer"]["vocab_size"]
    assert manifest["tokenizer"]["file"] == "tokenizer.json"
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    train, val = _expected_split(str(text_dir), 0.3)
    for split, docs in (("train", train), ("val", val)):
        tokens = _all_tokens(ds, split)
        assert manifest["splits"][split]["num_tokens"] == len(tokens)
        assert manifest["splits"][split]["num_documents"] == len(docs) == int((tokens == tok.eos_id).sum())
        decoded = _split_docs(tokens, tok.eos_id)
        assert [d.astype(np.uint32).tolist() for d in decoded] == [tok.encode(d.text).tolist() for d in docs]
        assert [tok.decode(d) for d in decoded] == [d.text.decode() for d in docs]
    # BPE compresses: fewer tokens than bytes.
    assert ds.num_tokens("train") < sum(len(d.text) + 1 for d in train)
    # The literal special-token text inside a document is ordinary text, not EOS.
    ids = tok.encode(b"a <|endoftext|> b")
    assert tok.eos_id not in ids.tolist() and tok.decode(ids) == "a <|endoftext|> b"
    assert tok.decode(np.array([5, tok.eos_id, 10**6])).endswith("<|endoftext|>\ufffd")


@pytest.mark.parametrize("source", ["dir", "stdlib"])
@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_two_builds_are_byte_identical(source: str, tokenizer: str, text_dir: Path, tmp_path: Path) -> None:
    src = str(text_dir) if source == "dir" else "stdlib"
    kw = dict(tokenizer=tokenizer, vocab_size=512 if tokenizer == "bpe" else None, shard_tokens=20_000)
    if source == "stdlib":
        kw["max_bytes"] = 300_000
    build_dataset(src, tmp_path / "one", **kw)
    build_dataset(src, tmp_path / "two", **kw)
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(tmp_path / "two"))
    assert ("tokenizer.json" in names) == (tokenizer == "bpe")
    for name in names:  # manifest.json, tokenizer.json and every shard
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    text = (tmp_path / "one" / "manifest.json").read_text()
    assert str(tmp_path / "one") not in text and "tmp-" not in text
    if source == "stdlib":
        manifest = json.loads(text)
        assert manifest["source"]["kind"] == "stdlib" and manifest["source"]["num_bytes"] <= 300_000
        assert manifest["source"]["num_bytes"] >= 300_000 - 3  # UTF-8 back-off of the last document


_TIE_DOCS = [b"aaabbbccccdddd xy yx zq qz", b"ab ba cd dc ef fe gh hg ij ji kl lk"] * 3


def test_bpe_training_is_deterministic() -> None:
    """Same tokenizer.json within a process and across processes (other hash seeds, 1 vs all threads)."""
    first = train_bpe(_TIE_DOCS, 330).to_bytes()
    assert all(train_bpe(_TIE_DOCS, 330).to_bytes() == first for _ in range(3))
    code = (
        "import hashlib, sys\n"
        "from tti_dist.data.tokenizer import train_bpe\n"
        f"docs = {_TIE_DOCS!r}\n"
        "sys.stdout.write(hashlib.sha256(train_bpe(docs, 330).to_bytes()).hexdigest())\n"
    )
    for env in ({"PYTHONHASHSEED": "1", "RAYON_NUM_THREADS": "1"}, {"PYTHONHASHSEED": "2"}):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                             capture_output=True, text=True, check=True).stdout
        assert out == hashlib.sha256(first).hexdigest()


# ---------------------------------------------------------------- sources


def test_text_file_source(tmp_path: Path) -> None:
    path = _write_tree(tmp_path, {"one.txt": "just one document\n"}) / "one.txt"
    assert list(iter_documents(str(path))) == [Document("one.txt", b"just one document\n")]
    desc = describe_source(str(path))
    assert desc == {
        "kind": "file", "path": str(path), "num_documents": 1, "num_bytes": 18,
        "files": [{"path": "one.txt", "size": 18,
                   "sha256": hashlib.sha256(b"just one document\n").hexdigest()}],
    }


def test_directory_source(text_dir: Path) -> None:
    _write_tree(text_dir, {"f/records.jsonl": '{"text": "from jsonl"}\n', "empty.txt": ""})
    docs = list(iter_documents(str(text_dir)))
    expected = sorted([*DOCS, "f/records.jsonl:1"])
    assert [d.name for d in docs] == expected  # hidden skipped, empty skipped, sorted by path
    assert docs[expected.index("f/records.jsonl:1")].text == b"from jsonl"
    assert docs[0].text == DOCS["a.txt"].encode()
    desc = describe_source(str(text_dir))
    assert desc["kind"] == "directory" and desc["text_field"] == "text"
    assert [f["path"] for f in desc["files"]] == sorted([*DOCS, "empty.txt", "f/records.jsonl"])
    for f in desc["files"]:
        data = (text_dir / f["path"]).read_bytes()
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()


def test_jsonl_source_custom_field(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [{"content": "first", "id": 1}, {"content": "sécond"}, {"content": ""}, {"content": "third"}]
    path.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" +
                    "\n".join(json.dumps(x) for x in lines[2:]) + "\n")
    docs = list(iter_documents(str(path), text_field="content"))
    assert docs == [Document("data.jsonl:1", b"first"), Document("data.jsonl:2", "sécond".encode()),
                    Document("data.jsonl:5", b"third")]
    assert describe_source(str(path), "content")["kind"] == "jsonl"


def test_parquet_source(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    texts = [f"row {i} " + "é" * i for i in range(7)] + [None, "last"]
    pq.write_table(pa.table({"id": list(range(9)), "body": texts}), path, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 5
    docs = list(iter_documents(str(path), text_field="body"))
    assert [d.name for d in docs] == [f"data.parquet:{i}" for i in [0, 1, 2, 3, 4, 5, 6, 8]]
    assert [d.text.decode() for d in docs] == texts[:7] + ["last"]
    # max_bytes stops early and cuts on a UTF-8 boundary: 6 + 8 + 4 ("row 2 é" would be 7) = 18.
    cut = list(iter_documents(str(path), text_field="body", max_bytes=18))
    assert [d.text.decode() for d in cut] == ["row 0 ", "row 1 é", "row "]


@pytest.mark.parametrize("fmt", ["file", "stream"])
def test_arrow_ipc_source(fmt: str, tmp_path: Path) -> None:
    path = tmp_path / "data-00000-of-00001.arrow"
    table = pa.table({"text": pa.array(["alpha", "beta", "gamma"], type=pa.large_string()),
                      "label": [0, 1, 2]})
    open_writer = pa.ipc.new_file if fmt == "file" else pa.ipc.new_stream
    with pa.OSFile(str(path), "wb") as sink, open_writer(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):  # two record batches
            writer.write_batch(batch)
    docs = list(iter_documents(str(path)))
    assert [(d.name, d.text) for d in docs] == [
        ("data-00000-of-00001.arrow:0", b"alpha"), ("data-00000-of-00001.arrow:1", b"beta"),
        ("data-00000-of-00001.arrow:2", b"gamma"),
    ]
    assert describe_source(str(path))["kind"] == "arrow"


def test_max_bytes_truncates_on_a_character_boundary(tmp_path: Path) -> None:
    _write_tree(tmp_path / "s", {"a.txt": "abc", "b.txt": "dé€", "c.txt": "never read"})
    assert [d.text for d in iter_documents(str(tmp_path / "s"), max_bytes=5)] == [b"abc", b"d"]
    assert [d.text for d in iter_documents(str(tmp_path / "s"), max_bytes=6)] == [b"abc", "dé".encode()]
    desc = describe_source(str(tmp_path / "s"), max_bytes=6)
    assert [f["path"] for f in desc["files"]] == ["a.txt", "b.txt"] and desc["num_bytes"] == 6


# ---------------------------------------------------------------- format


def test_arrays_are_views_of_the_mapped_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    text = rng.integers(32, 127, size=2_000_000, dtype=np.uint8).tobytes()
    _write_tree(tmp_path / "s", {"big1.txt": text[:1_000_000], "big2.txt": text[1_000_000:]})
    build_dataset(str(tmp_path / "s"), tmp_path / "ds", shard_tokens=600_000)
    before = pa.total_allocated_bytes()
    ds = open_dataset(tmp_path / "ds")
    shards = ds.split_shards("train") + ds.split_shards("val")
    assert pa.total_allocated_bytes() - before < 100_000  # vs 4 MB of tokens
    maps = []
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                maps.append((lo, hi, fields[-1] if len(fields) >= 6 else ""))
    files = [s["file"] for split in ("train", "val") for s in ds.manifest["splits"][split]["shards"]]
    assert len(shards) == len(files) == 4
    for shard, file in zip(shards, files):
        arr = shard["tokens"]
        assert not arr.flags.owndata and not arr.flags.writeable
        if maps:  # the array's memory is a mapping of the shard file itself
            addr = arr.ctypes.data
            owner = [name for lo, hi, name in maps if lo <= addr < hi]
            assert owner == [str((tmp_path / "ds" / file).resolve())]


def test_shards_cut_on_document_boundaries(tmp_path: Path) -> None:
    lengths = [30, 20, 100, 10]  # packed: 31, 21, 101, 11 -> doc ends 31, 52, 153, 164
    docs = [bytes([65 + i]) * n for i, n in enumerate(lengths)]
    tokens = np.concatenate([np.append(np.frombuffer(d, np.uint8).astype(np.uint32), 256) for d in docs])
    factor = np.where(tokens == 256, -1, np.arange(len(tokens)) % 7).astype(np.int16)
    val = np.array([1, 2, 256], dtype=np.uint32)
    manifest = write_dataset(
        tmp_path / "ds", splits={"train": {"tokens": tokens, "factor": factor},
                                 "val": {"tokens": val, "factor": np.array([0, -1, -1], np.int16)}},
        tokenizer=ByteTokenizer(), source={"kind": "test"}, num_documents={"train": 4, "val": 1},
        shard_tokens=64, column_descriptions={"factor": "position mod 7; -1 = inactive"},
    )
    shards = manifest["splits"]["train"]["shards"]
    # [0, 52) ends after doc 2; doc 3 (101 tokens) spans [52, 116) and [116, 164).
    assert [s["num_tokens"] for s in shards] == [52, 64, 48]
    assert [s["file"] for s in shards] == ["train-00000.arrow", "train-00001.arrow", "train-00002.arrow"]
    for s in shards + manifest["splits"]["val"]["shards"]:
        assert s["sha256"] == hashlib.sha256((tmp_path / "ds" / s["file"]).read_bytes()).hexdigest()
    assert manifest["columns"] == {
        "factor": {"dtype": "int16", "description": "position mod 7; -1 = inactive"},
        "tokens": {"dtype": "uint16", "description": "token ids; documents packed, each followed by eos_id"},
    }
    ds = open_dataset(tmp_path / "ds")
    assert ds.column_names == ["factor"]
    read = ds.split_shards("train")
    assert [len(s["tokens"]) for s in read] == [52, 64, 48]
    assert read[0]["factor"].dtype == np.int16
    np.testing.assert_array_equal(np.concatenate([s["tokens"] for s in read]), tokens)
    np.testing.assert_array_equal(np.concatenate([s["factor"] for s in read]), factor)
    np.testing.assert_array_equal(ds.split_shards("val")[0]["tokens"], val)
    with pytest.raises(ConfigError, match=r"data.split: 'test' is not a split .*available: train, val"):
        ds.split_shards("test")


def test_build_writes_several_shards_in_order(text_dir: Path, tmp_path: Path) -> None:
    manifest = build_dataset(str(text_dir), tmp_path / "ds", shard_tokens=100, val_fraction=0.2)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) >= 3 and all(s["num_tokens"] <= 100 for s in shards)
    ds = open_dataset(tmp_path / "ds")
    train, _ = _expected_split(str(text_dir), 0.2)
    expected = b"".join(d.text + b"\x00" for d in train)
    got = _all_tokens(ds, "train")
    assert (got == 256).sum() == len(train)
    assert np.where(got == 256, 0, got).astype(np.uint8).tobytes() == expected


def test_synthetic_tokenizer_and_uint32_tokens(tmp_path: Path) -> None:
    vocab = [f"w{i}" for i in range(70_000)] + ["<eos>"]
    tok = SyntheticTokenizer(vocab, eos_id=70_000)
    tokens = np.array([3, 69_999, 70_000, 5, 70_000], dtype=np.int64)
    manifest = write_dataset(tmp_path / "ds", splits={"train": {"tokens": tokens}}, tokenizer=tok,
                             source={"kind": "synthetic", "seed": 1}, num_documents={"train": 2})
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["file"] == "vocab.json"
    ds = open_dataset(tmp_path / "ds")
    assert ds.tokenizer.decode(_all_tokens(ds, "train")) == "w3 w69999 <eos> w5 <eos>"
    assert ds.tokenizer.encode(b"w3 w5").tolist() == [3, 5]
    assert ds.tokenizer.vocab_size == 70_001 and ds.eos_id == 70_000


# ---------------------------------------------------------------- corruption


@pytest.fixture
def sharded(text_dir: Path, tmp_path: Path) -> Path:
    build_dataset(str(text_dir), tmp_path / "ds", shard_tokens=100, val_fraction=0.2)
    return tmp_path / "ds"


def test_truncated_shard_is_named(sharded: Path) -> None:
    path = sharded / "train-00001.arrow"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ConfigError, match=r"data.path: shard 'train-00001.arrow' fails its sha256 check"):
        open_dataset(sharded)
    with pytest.raises(ConfigError, match=r"shard 'train-00001.arrow' cannot be read"):
        open_dataset(sharded, verify=False)


def test_flipped_byte_is_named(sharded: Path) -> None:
    path = sharded / "train-00001.arrow"
    manifest = json.loads((sharded / "manifest.json").read_bytes())
    expected = manifest["splits"]["train"]["shards"][1]["sha256"]
    data = bytearray(path.read_bytes())
    # Flip a byte inside the token data, so the file stays a valid Arrow file.
    first = np.asarray(open_dataset(sharded).split_shards("train")[1]["tokens"][:8]).tobytes()
    offset = bytes(data).index(first)
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    got = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ConfigError) as err:
        open_dataset(sharded)
    assert str(err.value) == (
        f"data.path: shard 'train-00001.arrow' fails its sha256 check (expected {expected}, got {got}); "
        "the dataset is corrupt or was modified"
    )
    # verify=False opens without hashing and sees the modified token.
    ds = open_dataset(sharded, verify=False)
    assert int(ds.split_shards("train")[1]["tokens"][0]) == int(np.frombuffer(first[:2], np.uint16)[0]) ^ 1


def test_deleted_shard_is_named(sharded: Path) -> None:
    (sharded / "val-00000.arrow").unlink()
    for verify in (True, False):
        with pytest.raises(ConfigError, match=r"data.path: shard 'val-00000.arrow' is missing"):
            open_dataset(sharded, verify=verify)


def test_verify_false_does_not_hash(sharded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(arrow_dataset, "sha256_file", lambda p: calls.append(p))
    ds = open_dataset(sharded, verify=False)
    assert calls == [] and ds.num_tokens("train") > 0


def test_garbled_manifest_and_tokenizer(text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    build_dataset(str(text_dir), out, tokenizer="bpe", vocab_size=300)
    tj = out / "tokenizer.json"
    tj.write_bytes(tj.read_bytes().replace(b'"<|endoftext|>"', b'"<|endoftexT|>"', 1))
    with pytest.raises(ConfigError, match=r"tokenizer file 'tokenizer.json' fails its sha256 check"):
        open_dataset(out, verify=False)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"data.path: '.*manifest.json' is not valid JSON"):
        open_dataset(out)
    (out / "manifest.json").unlink()
    with pytest.raises(ConfigError, match=r"data.path: .* is not a dataset: manifest.json is missing"):
        open_dataset(out)
    with pytest.raises(ConfigError, match=r"data.path: '.*nowhere' does not exist"):
        open_dataset(tmp_path / "nowhere")


def test_load_tokenizer_checks_the_entry(tmp_path: Path) -> None:
    tok = SyntheticTokenizer(["a", "b", "<eos>"], 2)
    info = tok.save(tmp_path)
    assert load_tokenizer(tmp_path, info).decode([0, 1, 2, 9]) == "a b <eos> \ufffd"
    with pytest.raises(ConfigError, match=r"tokenizer.eos_id=1 disagrees"):
        load_tokenizer(tmp_path, {**info, "eos_id": 1})
    with pytest.raises(ConfigError, match=r"tokenizer 'wordpiece' .* is unknown"):
        load_tokenizer(tmp_path, {**info, "name": "wordpiece"})


# ---------------------------------------------------------------- user errors


def test_empty_source_has_no_text(tmp_path: Path) -> None:
    _write_tree(tmp_path / "s", {".hidden": "x", "empty.txt": "", "sub/e.jsonl": '{"text": ""}\n'})
    with pytest.raises(ConfigError) as err:
        build_dataset(str(tmp_path / "s"), tmp_path / "ds")
    assert str(err.value) == f"data.source: {str(tmp_path / 's')!r} contains no text"
    assert not (tmp_path / "ds").exists()


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data.source: '.*nope' does not exist; use \"stdlib\""):
        build_dataset(str(tmp_path / "nope"), tmp_path / "ds")


def test_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ConfigError) as err:
        list(iter_documents(str(path)))
    assert str(err.value) == f"data.text_field: 'text' is missing in {str(path)!r} line 2; fields present: body"
    path.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(ConfigError, match=r"data.text_field: 'text' in '.*d.jsonl' line 2 is a JSON int"):
        list(iter_documents(str(path)))
    path.write_text('{"text": "ok"}\n\n{"text": \n')
    with pytest.raises(ConfigError, match=r"data.source: '.*d.jsonl' line 3 is not valid JSON"):
        list(iter_documents(str(path)))


def test_parquet_without_the_column(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1], "content": ["x"]}), path)
    with pytest.raises(ConfigError) as err:
        build_dataset(str(path), tmp_path / "ds")
    assert str(err.value) == (
        f"data.text_field: 'text' is not a column of {str(path)!r}; columns present: id, content"
    )
    with pytest.raises(ConfigError, match=r"column 'id' of .* has type int64; a string column is needed"):
        list(iter_documents(str(path), text_field="id"))


def test_overwrite_refusal(text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    build_dataset(str(text_dir), out)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match=r"^--out: '.*ds' exists and is not empty; pass --overwrite"):
        build_dataset(str(text_dir), out, tokenizer="bpe", vocab_size=300)
    assert (out / "manifest.json").read_bytes() == before
    manifest = build_dataset(str(text_dir), out, tokenizer="bpe", vocab_size=300, overwrite=True)
    assert manifest["tokenizer"]["name"] == "bpe" and open_dataset(out).tokenizer.name == "bpe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "src"]  # no tmp/old dirs left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match=r"holds no manifest.json, so it is not a dataset"):
        build_dataset(str(text_dir), tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    build_dataset(str(text_dir), tmp_path / "empty")  # an existing empty directory is fine
    assert (tmp_path / "empty" / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(tokenizer="bpe", vocab_size=257), r"^--vocab-size: 257 is not allowed for the BPE tokenizer; "
                                                r"use an integer in \[258, 1048576\]"),
        (dict(tokenizer="bpe", vocab_size=2_000_000), r"^--vocab-size: 2000000 is not allowed"),
        (dict(tokenizer="bpe"), r"^--vocab-size: required with --tokenizer bpe"),
        (dict(tokenizer="byte", vocab_size=1000), r"^--vocab-size: 1000 is not allowed with --tokenizer byte"),
        (dict(tokenizer="wordpiece"), r"^--tokenizer: 'wordpiece' is not allowed; use one of byte, bpe"),
        (dict(val_fraction=1.0), r"^--val-fraction: 1.0 is not allowed; use a number in \(0, 1\)"),
        (dict(shard_tokens=0), r"^--shard-tokens: 0 is not allowed"),
        (dict(max_bytes=0), r"^data.max_bytes: 0 is not allowed"),
    ],
)
def test_bad_build_arguments(kw: dict, message: str, text_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        build_dataset(str(text_dir), tmp_path / "ds", **kw)
    assert not (tmp_path / "ds").exists()


def test_single_document_leaves_no_train(tmp_path: Path) -> None:
    path = _write_tree(tmp_path, {"one.txt": "only document"}) / "one.txt"
    with pytest.raises(ConfigError, match=r"^--val-fraction: 0.01 leaves no document for training"):
        build_dataset(str(path), tmp_path / "ds")


def test_failed_write_leaves_nothing(text_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path, columns):
        raise OSError("disk full")

    monkeypatch.setattr(arrow_dataset, "_write_shard", boom)
    with pytest.raises(OSError, match="disk full"):
        build_dataset(str(text_dir), tmp_path / "ds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    shutil.rmtree(text_dir)
