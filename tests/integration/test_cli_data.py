"""`tti data build | synth | info` as a user runs them (subprocesses, real files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tti(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tti_dist.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("tti: error:")]


def test_build_info_and_corruption(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.txt").write_text(f"document {i}\n" * 50)
    proc = tti("data", "build", str(src), "--out", str(tmp_path / "ds"), "--val-fraction", "0.2")
    assert proc.returncode == 0, proc.stderr
    assert "tokenizer byte (vocab 257, eos 256)" in proc.stdout
    info = tti("data", "info", str(tmp_path / "ds"))
    assert info.returncode == 0 and info.stdout == proc.stdout  # the same summary, after a sha256 check
    # Alter one byte of a shard: opening it must fail naming the file, with exit 2.
    shard = tmp_path / "ds" / "train-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = tti("data", "info", str(tmp_path / "ds"))
    assert bad.returncode == 2
    (line,) = error_lines(bad)
    assert "train-00000.arrow" in line and "sha256" in line
    assert "Traceback" not in bad.stderr
    # The same directory cannot be built over without --overwrite.
    again = tti("data", "build", str(src), "--out", str(tmp_path / "ds"))
    assert again.returncode == 2 and len(error_lines(again)) == 1


def test_synth_and_its_errors(tmp_path):
    proc = tti("data", "synth", "factored", "--out", str(tmp_path / "syn"), "--set", "num_documents=200")
    assert proc.returncode == 0, proc.stderr
    assert "per-token columns: factor_attribute, factor_negation, factor_number, factor_role, factor_topic, is_noise" in proc.stdout
    bad_key = tti("data", "synth", "factored", "--out", str(tmp_path / "x"), "--set", "p_nois=0.1")
    assert bad_key.returncode == 2
    assert error_lines(bad_key)[0].startswith("tti: error: synth.p_nois: unknown key; did you mean 'p_noise'?")
    bad_value = tti("data", "synth", "factored", "--out", str(tmp_path / "y"), "--set", "p_noise=1.5")
    assert bad_value.returncode == 2 and "synth.p_noise: 1.5" in error_lines(bad_value)[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_build_with_workers_and_a_tokenizer_file(tmp_path, tokenizer_json):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + "words and more words " * (i % 7 + 1)}) + "\n"
                              for i in range(300)))
    tok = tokenizer_json(tmp_path / "tok.json", ["<|endoftext|>"], vocab_size=300)
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"ds{workers}"
        proc = tti("data", "build", str(corpus), "--out", str(out), "--tokenizer", str(tok), "--workers", workers,
                   "--val-fraction", "0.1", "--shard-tokens", "2000")
        assert proc.returncode == 0, proc.stderr
        assert "tokenizer pretrained (vocab 300, eos 0)" in proc.stdout
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1] and len(outs[0]) > 4  # manifest, tokenizer.json, shards: byte-identical

    no_eos = tokenizer_json(tmp_path / "no-eos.json", ["[PAD]", "[SEP]"], vocab_size=300)
    cases = [
        (["--workers", "0"], "tti: error: --workers: 0 is not allowed; use a positive number of processes"),
        (["--workers", "-1"], "tti: error: --workers: -1 is not allowed"),
        (["--tokenizer", "wordpiece"], "tti: error: --tokenizer: 'wordpiece' is not allowed; use one of byte, bpe"),
        (["--tokenizer", str(tmp_path / "none.json")],
         f"tti: error: --tokenizer: '{tmp_path / 'none.json'}' does not exist"),
        (["--tokenizer", str(no_eos)], f"tti: error: --tokenizer: '{no_eos}' has no end-of-document token"),
        (["--tokenizer", str(tok), "--eos-token", "</s>"], "tti: error: --eos-token: '</s>' is not a token of"),
        (["--tokenizer", "bpe", "--vocab-size", "300", "--bpe-sample-bytes", "0"],
         "tti: error: --bpe-sample-bytes: 0 is not allowed"),
    ]
    for args, start in cases:
        bad = tti("data", "build", str(corpus), "--out", str(tmp_path / "bad"), *args)
        assert bad.returncode == 2, (args, bad.stderr)
        (line,) = error_lines(bad)
        assert line.startswith(start), (args, line)
        assert "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
