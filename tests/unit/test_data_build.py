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

from tti_dist.data import dataset_reader, dataset_writer
from tti_dist.data.dataset_reader import open_dataset
from tti_dist.data.dataset_writer import write_dataset
from tti_dist.data.build import BuildStats, build_dataset, split_documents
from tti_dist.data.sources import Document, describe_source, iter_documents
from tti_dist.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    SyntheticTokenizer,
    Tokenizer,
    PretrainedTokenizer,
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
        "bpe_sample_bytes": None, "eos_token": None, "max_bytes": None, "shard_tokens": 16_777_216,
        "text_field": "text", "tokenizer": "byte", "val_fraction": 0.3, "vocab_size": None,
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
    monkeypatch.setattr(dataset_reader, "sha256_file", lambda p: calls.append(p))
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
        (dict(workers=0), r"^--workers: 0 is not allowed; use a positive number of processes$"),
        (dict(workers=-2), r"^--workers: -2 is not allowed"),
        (dict(workers=1.5), r"^--workers: 1.5 is not allowed"),
        (dict(buffer_bytes=0), r"^--buffer-bytes: 0 is not allowed; use a positive number of bytes$"),
        (dict(tokenizer="bpe", vocab_size=300, bpe_sample_bytes=0), r"^--bpe-sample-bytes: 0 is not allowed"),
        (dict(eos_token="</s>"), r"^--eos-token: '</s>' is not allowed with --tokenizer byte"),
        (dict(tokenizer="missing/tokenizer.json"),
         r"^--tokenizer: 'missing/tokenizer.json' does not exist or is not a file; use byte, bpe or a path"),
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

    monkeypatch.setattr(dataset_writer, "_write_shard", boom)
    with pytest.raises(OSError, match="disk full"):
        build_dataset(str(text_dir), tmp_path / "ds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    shutil.rmtree(text_dir)


# ---------------------------------------------------------------- streaming build


def _jsonl_corpus(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _corpus_texts(num_documents: int, seed: int = 0) -> list[str]:
    """Varied documents of 50..400 bytes (some non-ASCII), deterministic."""
    rng = np.random.default_rng(seed)
    words = ["the", "model", "token", "def", "return", "naïve", "café", "日本", "layer", "x", "=", "(", ")",
             "sparse", "feature", "unit", "\n", "    "]
    return [" ".join(rng.choice(words, size=int(rng.integers(10, 80)))) for _ in range(num_documents)]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_workers_give_byte_identical_datasets(tokenizer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--workers 2 (a real spawned pool, many small batches) writes the same bytes as 1."""
    src = _jsonl_corpus(tmp_path / "c.jsonl", _corpus_texts(600))
    kw = dict(tokenizer=tokenizer, vocab_size=320 if tokenizer == "bpe" else None, val_fraction=0.1,
              shard_tokens=5_000, bpe_sample_bytes=30_000)
    one = build_dataset(str(src), tmp_path / "one", workers=1, **kw)
    # The second build's shard buffers start small and grow (the path of a huge --shard-tokens).
    monkeypatch.setattr(dataset_writer, "_LAZY_BUFFER_BYTES", 0)
    monkeypatch.setattr(dataset_writer, "_MIN_SHARD_BUFFER", 64)
    stats = BuildStats()
    two = build_dataset(str(src), tmp_path / "two", workers=2, buffer_bytes=8_000, stats=stats, **kw)
    assert stats.num_batches >= 20  # many batches, in flight together
    assert os.getpid() not in stats.tokenizing_pids and 1 <= len(stats.tokenizing_pids) <= 2  # other processes
    assert one == two
    assert sorted(one["build"]) == ["bpe_sample_bytes", "eos_token", "max_bytes", "shard_tokens", "text_field",
                                    "tokenizer", "val_fraction", "vocab_size"]  # no workers, no buffer size
    assert _files(tmp_path / "one") == _files(tmp_path / "two")  # manifest, tokenizer, every shard
    assert len(one["splits"]["train"]["shards"]) > 3
    assert one["splits"]["train"]["num_documents"] + one["splits"]["val"]["num_documents"] == 600


def test_streaming_memory_is_bounded_by_the_buffer(tmp_path: Path) -> None:
    """What a build holds between source and shard buffers stays under --buffer-bytes (plus the
    document just read) for a corpus 100x larger, and does not grow with the corpus."""
    texts = _corpus_texts(4_000, seed=1)
    longest = max(len(t.encode()) for t in texts)
    buffer_bytes = 8_192
    peaks = []
    for n, name in ((400, "small"), (4_000, "large")):
        src = _jsonl_corpus(tmp_path / f"{name}.jsonl", texts[:n])
        stats = BuildStats()
        manifest = build_dataset(str(src), tmp_path / name, buffer_bytes=buffer_bytes, shard_tokens=20_000,
                                 stats=stats)
        assert manifest["source"]["num_bytes"] > (10 if n == 400 else 100) * buffer_bytes
        assert stats.peak_buffered_bytes <= buffer_bytes + longest
        assert stats.peak_shard_buffer_tokens <= 20_000
        assert stats.tokenizing_pids == {os.getpid()}  # --workers 1 tokenizes in this process
        peaks.append((stats.peak_buffered_bytes, stats.peak_shard_buffer_tokens))
    # Ten times the corpus, no more held: both runs fill the same bounded buffers.
    assert peaks[1][0] <= buffer_bytes + longest and peaks[1][1] == peaks[0][1] == 20_000


def test_bpe_is_trained_on_the_sample_only(tmp_path: Path) -> None:
    """Documents after the first bpe_sample_bytes of train text cannot change the vocabulary."""
    texts = _corpus_texts(300, seed=2)
    sample = 6_000  # about the first 30 documents
    later = ["zqvx" * 40 + " " + "zqvx" * 40] * 270  # would dominate the merges if it were seen
    a = _jsonl_corpus(tmp_path / "a" / "c.jsonl", texts)
    b = _jsonl_corpus(tmp_path / "b" / "c.jsonl", texts[:30] + later)  # same names, same split
    kw = dict(tokenizer="bpe", vocab_size=400, bpe_sample_bytes=sample, val_fraction=0.1)
    stats = BuildStats()
    ma = build_dataset(str(a), tmp_path / "da", stats=stats, **kw)
    mb = build_dataset(str(b), tmp_path / "db", **kw)
    train, _ = split_documents(list(iter_documents(str(a))), 0.1)
    assert stats.bpe_sample_bytes == sample  # the document crossing the limit is cut there
    assert sum(len(d.text) for d in train[:stats.bpe_sample_documents - 1]) < sample
    assert train[stats.bpe_sample_documents - 1].name in {f"c.jsonl:{i}" for i in range(1, 31)}  # before `later`
    assert (tmp_path / "da" / "tokenizer.json").read_bytes() == (tmp_path / "db" / "tokenizer.json").read_bytes()
    assert ma["build"]["bpe_sample_bytes"] == sample and ma["tokenizer"]["sha256"] == mb["tokenizer"]["sha256"]
    assert ma["source"]["num_documents"] == mb["source"]["num_documents"] == 300  # both read in full
    # The test has teeth: with a sample that reaches the later documents, they do shape it.
    mc = build_dataset(str(b), tmp_path / "dc", **{**kw, "bpe_sample_bytes": 10**8})
    assert mc["tokenizer"]["sha256"] != mb["tokenizer"]["sha256"]
    assert open_dataset(tmp_path / "dc").tokenizer.hf_tokenizer.token_to_id("zqvxzqvx") is not None
    assert open_dataset(tmp_path / "db").tokenizer.hf_tokenizer.token_to_id("zqvxzqvx") is None


def test_pretrained_tokenizer_json(tmp_path: Path, tokenizer_json) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    tj = tokenizer_json(tmp_path / "my-tokenizer.json", ["<pad>", "<|endoftext|>", "<unk>"], _corpus_texts(200, seed=3))
    src = _jsonl_corpus(tmp_path / "c.jsonl", _corpus_texts(300, seed=4))
    manifest = build_dataset(str(src), tmp_path / "ds", tokenizer=str(tj), val_fraction=0.1, shard_tokens=4_000)
    lib = HFTokenizer.from_file(str(tj))
    assert manifest["tokenizer"] == {
        "name": "pretrained", "file": "tokenizer.json", "eos_token": "<|endoftext|>", "eos_id": 1,
        "sha256": hashlib.sha256(tj.read_bytes()).hexdigest(), "vocab_size": lib.get_vocab_size(),
    }
    assert manifest["build"]["tokenizer"] == str(tj) and manifest["build"]["vocab_size"] is None
    assert (tmp_path / "ds" / "tokenizer.json").read_bytes() == tj.read_bytes()  # a verbatim copy
    ds = open_dataset(tmp_path / "ds")
    assert isinstance(ds.tokenizer, PretrainedTokenizer) and ds.eos_id == 1
    train, val = _expected_split(str(src), 0.1)
    for split, docs in (("train", train), ("val", val)):
        got = [d.tolist() for d in _split_docs(_all_tokens(ds, split).astype(np.int64), 1)]
        assert got == [lib.encode(d.text.decode()).ids for d in docs]  # exactly the library's ids
    # Two workers, same bytes.
    build_dataset(str(src), tmp_path / "ds2", tokenizer=str(tj), val_fraction=0.1, shard_tokens=4_000, workers=2)
    assert _files(tmp_path / "ds") == _files(tmp_path / "ds2")


def test_pretrained_tokenizer_eos_rule_and_errors(tmp_path: Path, tokenizer_json) -> None:
    src = _jsonl_corpus(tmp_path / "c.jsonl", _corpus_texts(50, seed=5))
    llama_like = tokenizer_json(tmp_path / "a.json", ["<unk>", "<s>", "</s>"], _corpus_texts(200, seed=3))
    m = build_dataset(str(src), tmp_path / "a", tokenizer=str(llama_like))
    assert m["tokenizer"]["eos_token"] == "</s>" and m["tokenizer"]["eos_id"] == 2
    m = build_dataset(str(src), tmp_path / "b", tokenizer=str(llama_like), eos_token="<s>")
    assert m["tokenizer"]["eos_id"] == 1 and m["build"]["eos_token"] == "<s>"
    bert_like = tokenizer_json(tmp_path / "bert.json", ["[PAD]", "[CLS]", "[SEP]"], _corpus_texts(200, seed=3))
    cases = [
        (dict(tokenizer=str(bert_like)),
         rf"^--tokenizer: '{bert_like}' has no end-of-document token: none of its special tokens "
         r"\(\[PAD\], \[CLS\], \[SEP\]\) is one of <\|endoftext\|>, <\|end_of_text\|>, </s>, <eos>, "
         r"<\|eos\|>; name one with --eos-token$"),
        (dict(tokenizer=str(llama_like), eos_token="<|endoftext|>"),
         rf"^--eos-token: '<\|endoftext\|>' is not a token of '{llama_like}'; its special tokens: <unk>, <s>, </s>$"),
        (dict(tokenizer=str(llama_like), vocab_size=420),
         r"^--vocab-size: 420 is not allowed with --tokenizer '.*a.json', whose vocabulary comes from the file"),
    ]
    (tmp_path / "garbled.json").write_text('{"model": 5}')
    cases.append((dict(tokenizer=str(tmp_path / "garbled.json")),
                  r"^--tokenizer: '.*garbled.json' is not a HuggingFace tokenizers JSON file \("))
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            build_dataset(str(src), tmp_path / "bad", **kw)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "bad").exists()
    # A build with --eos-token of a special token round-trips through open_dataset.
    assert open_dataset(tmp_path / "b").tokenizer.eos_id == 1


def test_failed_streaming_build_keeps_the_old_dataset(tmp_path: Path) -> None:
    """An error after shards were written (a bad record near the end) leaves the dataset at
    the output path exactly as it was, and no temporary directory."""
    texts = _corpus_texts(400, seed=6)
    good = _jsonl_corpus(tmp_path / "good.jsonl", texts)
    build_dataset(str(good), tmp_path / "ds", shard_tokens=3_000)
    before = _files(tmp_path / "ds")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"text": 5}\n')
    for workers in (1, 2):
        with pytest.raises(ConfigError, match=r"data.text_field: 'text' in '.*bad.jsonl' line 401 is a JSON int"):
            build_dataset(str(bad), tmp_path / "ds", shard_tokens=3_000, buffer_bytes=4_096, overwrite=True,
                          workers=workers)
        assert _files(tmp_path / "ds") == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "ds", "good.jsonl"]


def test_run_dataset_with_a_tokenizer_file(tmp_path: Path, tokenizer_json) -> None:
    """`tti train` with data.tokenizer: FILE.json builds RUN/dataset with it, reuses it, and
    refuses it once the file at that path has changed."""
    from tti_dist.config import load_config
    from tti_dist.data.prepare import resolve_dataset

    tj = tokenizer_json(tmp_path / "tok.json", ["<|endoftext|>"], _corpus_texts(200, seed=3))
    src = _jsonl_corpus(tmp_path / "c.jsonl", _corpus_texts(100, seed=7))
    cfg = load_config(None, [f"data.source={src}", f"data.tokenizer={tj}", "model.vocab_size=512"])
    resolved, ds = resolve_dataset(cfg, tmp_path / "run")
    assert resolved.data.path == str(tmp_path / "run" / "dataset") and ds.tokenizer.name == "pretrained"
    assert ds.manifest["tokenizer"]["sha256"] == hashlib.sha256(tj.read_bytes()).hexdigest()
    assert resolve_dataset(cfg, tmp_path / "run")[1].manifest == ds.manifest  # reused as is
    tokenizer_json(tj, ["<pad>", "<|endoftext|>"], _corpus_texts(200, seed=3))  # another file at the same path
    with pytest.raises(ConfigError, match=r"^data.tokenizer: '.*tok.json' is not the file .*run/dataset was built "
                                          r"with \(sha256 [0-9a-f]{64}\); use a new --run-dir or set data.path$"):
        resolve_dataset(cfg, tmp_path / "run")


def _rss_file_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))
    except (OSError, StopIteration):
        return None


def test_record_files_are_read_in_bounded_memory(tmp_path: Path) -> None:
    """Reading a Parquet/Arrow source holds about one batch, not what was read before: no
    pre-buffered column chunks (Arrow allocations) and no memory map (resident file pages)."""
    row = "x" * 1000
    table = pa.table({"text": [f"{i} {row}" for i in range(16_000)]})  # 16 MB of text
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=500, compression="none")
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=500):
            writer.write_batch(batch)
    del table
    for name in ("d.parquet", "d.arrow"):
        base_alloc, base_file = pa.total_allocated_bytes(), _rss_file_kb()
        peak_alloc = peak_file = 0
        for i, doc in enumerate(iter_documents(str(tmp_path / name))):
            if i % 500 == 0:
                peak_alloc = max(peak_alloc, pa.total_allocated_bytes() - base_alloc)
                if base_file is not None:
                    peak_file = max(peak_file, _rss_file_kb() - base_file)
        assert i == 15_999
        assert peak_alloc < 4_000_000, (name, peak_alloc)  # a few 0.5 MB batches, not 16 MB
        assert peak_file < 4_000, (name, peak_file)  # kB of newly resident file pages
