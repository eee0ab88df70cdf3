"""Tests of the window sources and the distributed batch loader.

Most loader tests use a synthetic token array in which window w is filled with the value w
(`seq_len + 1` copies), so a batch row names the window it came from and sets of window
indices can be compared exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tti_dist.data import (
    BYTE_VOCAB_SIZE,
    EOS_TOKEN,
    DatasetWindows,
    DistributedBatchLoader,
    TokenWindows,
    decode_tokens,
)
from tti_dist.errors import ConfigError

SEQ_LEN = 3


def labelled_windows(num_windows: int, val_fraction: float = 0.1, extra: int = 2) -> TokenWindows:
    """Windows where every token of window w equals w, plus `extra` tokens of a partial window."""
    tokens = np.repeat(np.arange(num_windows, dtype=np.uint16), SEQ_LEN + 1)
    tokens = np.concatenate([tokens, np.full(extra, 999, dtype=np.uint16)])
    return TokenWindows(tokens, SEQ_LEN, val_fraction)


def window_ids(batch: torch.Tensor) -> list[int]:
    """Window index of each row of a batch of labelled windows (checking the row is uniform)."""
    assert batch.dtype == torch.int64
    assert batch.shape[1] == SEQ_LEN + 1
    assert torch.equal(batch, batch[:, :1].expand_as(batch))
    return batch[:, 0].tolist()


def take(loader: DistributedBatchLoader, num: int) -> list[torch.Tensor]:
    return [loader.next_batch() for _ in range(num)]


def assert_same_batches(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------- byte-level ids

def test_vocab_constants() -> None:
    assert EOS_TOKEN == 256
    assert BYTE_VOCAB_SIZE == 257


def test_decode_tokens() -> None:
    tokens = np.array(list(b"hello") + [EOS_TOKEN] + list("h\u00e9llo \u2603\n".encode()) + [EOS_TOKEN], dtype=np.uint16)
    assert decode_tokens(tokens) == "hello\n<|eos|>\nh\u00e9llo \u2603\n\n<|eos|>\n"
    assert decode_tokens(torch.from_numpy(tokens.astype(np.int64))) == decode_tokens(tokens.tolist())
    assert decode_tokens([0xFF, 104, 300, 105]) == "\ufffdh\ufffdi"


def test_token_windows_split() -> None:
    windows = labelled_windows(20, val_fraction=0.1)
    assert windows.num_train_windows == 18
    assert windows.num_val_windows == 2
    assert windows.train_window(0).tolist() == [0] * (SEQ_LEN + 1)
    assert windows.train_window(17).tolist() == [17] * (SEQ_LEN + 1)
    assert windows.val_window(0).tolist() == [18] * (SEQ_LEN + 1)
    assert windows.val_window(1).tolist() == [19] * (SEQ_LEN + 1)
    with pytest.raises(IndexError):
        windows.train_window(18)
    with pytest.raises(IndexError):
        windows.val_window(-1)
    # Even a zero fraction keeps one validation window.
    assert labelled_windows(20, val_fraction=0.0).num_val_windows == 1
    # Windows are read-only views of the corpus.
    with pytest.raises(ValueError):
        windows.train_window(0)[0] = 7


def test_token_windows_too_small_is_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        TokenWindows(np.arange(7, dtype=np.uint16), seq_len=3, val_fraction=0.5)
    msg = str(info.value)
    assert "data.val_fraction=0.5" in msg and "data.seq_len=3" in msg
    assert "7 tokens" in msg and "1 windows" in msg


# ---------------------------------------------------------------- loader


def test_batches_shape_dtype_and_determinism() -> None:
    windows = labelled_windows(40)
    a = DistributedBatchLoader(windows, "train", 4, dp_rank=0, dp_size=1, seed=7)
    b = DistributedBatchLoader(windows, "train", 4, dp_rank=0, dp_size=1, seed=7)
    c = DistributedBatchLoader(windows, "train", 4, dp_rank=0, dp_size=1, seed=8)
    batches_a, batches_b, batches_c = take(a, 20), take(b, 20), take(c, 20)
    assert batches_a[0].shape == (4, SEQ_LEN + 1)
    assert batches_a[0].dtype == torch.int64
    assert_same_batches(batches_a, batches_b)
    assert any(not torch.equal(x, y) for x, y in zip(batches_a, batches_c))


def test_epoch_order_matches_seeded_permutation() -> None:
    windows = labelled_windows(40)  # 36 train windows
    loader = DistributedBatchLoader(windows, "train", 5, dp_rank=0, dp_size=1, seed=3)
    assert loader.batches_per_epoch == 7  # 35 used, 1 dropped
    ids = [i for batch in take(loader, 14) for i in window_ids(batch)]
    perm0 = np.random.default_rng([3, 0]).permutation(36)
    perm1 = np.random.default_rng([3, 1]).permutation(36)
    assert ids == perm0[:35].tolist() + perm1[:35].tolist()

    unshuffled = DistributedBatchLoader(windows, "train", 5, dp_rank=0, dp_size=1, seed=3, shuffle=False)
    ids = [i for batch in take(unshuffled, 8) for i in window_ids(batch)]
    assert ids == list(range(35)) + list(range(5))


def test_dp_ranks_disjoint_and_cover_epoch() -> None:
    windows = labelled_windows(60, val_fraction=0.2)  # 48 train windows
    mbs, dp_size = 3, 2
    ranks = [DistributedBatchLoader(windows, "train", mbs, r, dp_size, seed=11) for r in range(dp_size)]
    assert ranks[0].batches_per_epoch == 8  # 48 // 6
    per_rank = [[i for b in take(loader, 8) for i in window_ids(b)] for loader in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == 24
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(48))

    # Each global micro-step splits consecutive windows of the epoch order between the ranks.
    perm = np.random.default_rng([11, 0]).permutation(48)
    for step in range(8):
        global_ids = perm[step * 6 : step * 6 + 6].tolist()
        assert per_rank[0][step * 3 : step * 3 + 3] == global_ids[:3]
        assert per_rank[1][step * 3 : step * 3 + 3] == global_ids[3:]


def test_dp_ranks_drop_same_tail() -> None:
    windows = labelled_windows(50, val_fraction=0.1)  # 45 train windows, 4 per step: 11 steps, 1 dropped
    ranks = [DistributedBatchLoader(windows, "train", 2, r, 2, seed=5) for r in range(2)]
    assert ranks[0].batches_per_epoch == 11
    ids = [[i for b in take(loader, 11) for i in window_ids(b)] for loader in ranks]
    union = set(ids[0]) | set(ids[1])
    perm = np.random.default_rng([5, 0]).permutation(45)
    assert union == set(perm[:44].tolist())
    assert len(ids[0]) + len(ids[1]) == 44


def test_tp_ranks_of_one_dp_rank_identical() -> None:
    windows = labelled_windows(40)
    tp0 = DistributedBatchLoader(windows, "train", 2, dp_rank=1, dp_size=2, seed=9)
    tp1 = DistributedBatchLoader(windows, "train", 2, dp_rank=1, dp_size=2, seed=9)
    assert_same_batches(take(tp0, 25), take(tp1, 25))


@pytest.mark.parametrize("num_before", [3, 9, 10])
def test_resume_continues_exactly(num_before: int) -> None:
    # 36 train windows, 8 per global step: 4 batches per epoch, so 9 and 10 resume
    # mid-epoch after crossing a boundary and the next batches cross another one.
    windows = labelled_windows(40)
    num_after = 6
    kwargs = dict(windows=windows, split="train", micro_batch_size=4, dp_rank=1, dp_size=2, seed=21)
    reference = take(DistributedBatchLoader(**kwargs), num_before + num_after)

    first = DistributedBatchLoader(**kwargs)
    assert first.batches_per_epoch == 4
    assert_same_batches(take(first, num_before), reference[:num_before])
    state = first.state_dict()
    assert all(type(v) is int for v in state.values())
    assert set(state) == {"epoch", "index"}

    resumed = DistributedBatchLoader(**kwargs)
    resumed.load_state_dict(dict(state))
    assert resumed.state_dict() == state
    assert_same_batches(take(resumed, num_after), reference[num_before:])


def test_resume_rejects_state_that_does_not_fit() -> None:
    loader = DistributedBatchLoader(labelled_windows(40), "train", 4, 0, 1, seed=1)
    with pytest.raises(ValueError):
        loader.load_state_dict({"epoch": 0, "index": loader.batches_per_epoch + 1})


def test_val_fixed_batches_deterministic_and_disjoint_from_train() -> None:
    windows = labelled_windows(100, val_fraction=0.12)  # 88 train, 12 val windows
    assert windows.num_val_windows == 12
    mbs, dp_size = 2, 2
    val = [DistributedBatchLoader(windows, "val", mbs, r, dp_size, seed=4) for r in range(dp_size)]
    assert val[0].batches_per_epoch == 3

    fixed = [loader.fixed_batches(5) for loader in val]
    # Global step k reads val windows 4k..4k+3 (unshuffled), wrapping after 3 steps.
    expected_steps = [[88, 89, 90, 91], [92, 93, 94, 95], [96, 97, 98, 99],
                      [88, 89, 90, 91], [92, 93, 94, 95]]
    for k, ids in enumerate(expected_steps):
        assert window_ids(fixed[0][k]) == ids[:2]
        assert window_ids(fixed[1][k]) == ids[2:]

    # Independent of the loader's position and repeatable.
    take(val[0], 2)
    assert_same_batches(val[0].fixed_batches(5), fixed[0])

    train_ids = {
        i
        for r in range(dp_size)
        for b in take(DistributedBatchLoader(windows, "train", mbs, r, dp_size, seed=4), 22)
        for i in window_ids(b)
    }
    val_ids = {i for rank_batches in fixed for b in rank_batches for i in window_ids(b)}
    assert train_ids == set(range(88))
    assert val_ids == set(range(88, 100))

    with pytest.raises(ValueError):
        DistributedBatchLoader(windows, "train", mbs, 0, dp_size, seed=4).fixed_batches(1)


def test_split_smaller_than_global_batch_is_config_error() -> None:
    windows = labelled_windows(20, val_fraction=0.1)  # 18 train, 2 val windows
    with pytest.raises(ConfigError) as info:
        DistributedBatchLoader(windows, "val", 2, 0, 2, seed=0)
    msg = str(info.value)
    assert msg.startswith("train.micro_batch_size: 2 x data-parallel size 2 = 4")
    assert "val split has only 2 windows" in msg
    with pytest.raises(ConfigError, match=r"^train\.micro_batch_size: 10 x .* only 18 windows"):
        DistributedBatchLoader(windows, "train", 10, 0, 2, seed=0)


def test_real_text_end_to_end(tmp_path: Path) -> None:
    """Text files -> tti data build -> DatasetWindows -> loader -> the original text back."""
    from tti_dist.data import build_dataset, open_dataset

    texts = {f"doc{d}.txt": "".join(f"doc {d} line {i}: the quick brown fox\n" for i in range(60)) for d in range(6)}
    for name, text in texts.items():
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / name).write_text(text)
    build_dataset(str(tmp_path / "src"), tmp_path / "ds", val_fraction=0.2)
    dataset = open_dataset(tmp_path / "ds")
    windows = DatasetWindows({s: dataset.split_shards(s) for s in ("train", "val")}, 16)
    loader = DistributedBatchLoader(windows, "train", 4, 0, 1, seed=0, shuffle=False)
    batch = loader.next_batch()
    assert batch.shape == (4, 17)
    stream = "\n<|eos|>\n".join(texts.values())
    assert decode_tokens(batch.reshape(-1)) in stream  # 68 consecutive bytes of the packed documents
    assert int(batch.max()) < BYTE_VOCAB_SIZE


# ---------------------------------------------------------------- dataset windows (shards + columns)

def sharded_windows(shard_windows: list[int], seq_len: int = SEQ_LEN, tail: int = 2) -> DatasetWindows:
    """Shards whose k-th window is filled with a running window id; a `factor` column holds
    10 * id, and each shard has a `tail` of tokens too short for a window."""
    shards, next_id = [], 0
    for n in shard_windows:
        ids = np.repeat(np.arange(next_id, next_id + n, dtype=np.int64), seq_len + 1)
        ids = np.concatenate([ids, np.full(tail, 999)])
        shards.append({"tokens": ids.astype(np.uint16), "factor": (ids * 10).astype(np.int16)})
        next_id += n
    val = [{"tokens": np.full(8 * (seq_len + 1), 500, np.uint16), "factor": np.full(8 * (seq_len + 1), -1, np.int16)}]
    return DatasetWindows({"train": shards, "val": val}, seq_len)


def test_dataset_windows_span_shards_without_crossing_them() -> None:
    windows = sharded_windows([5, 3, 7])
    assert windows.num_windows("train") == 15 and windows.num_windows("val") == 8
    assert windows.column_names == ("factor",)
    got = windows.gather("train", np.arange(15), ("factor",))
    assert [int(r[0]) for r in got["tokens"]] == list(range(15))  # shard tails (999) never appear
    assert torch.equal(torch.from_numpy(got["factor"].astype(np.int64)), torch.from_numpy(got["tokens"].astype(np.int64)) * 10)


def test_dataset_loader_dp_ranks_disjoint_cover_and_tp_identical() -> None:
    windows = sharded_windows([5, 3, 7, 9])  # 24 windows; mbs 3 x dp 2 -> 4 micro-steps per epoch
    seen = []
    for dp_rank in range(2):
        loader = DistributedBatchLoader(windows, "train", 3, dp_rank, 2, seed=5)
        twin = DistributedBatchLoader(windows, "train", 3, dp_rank, 2, seed=5)  # a TP peer
        batches = [loader.next_batch_columns(("factor",)) for _ in range(4)]
        for b in batches:
            assert torch.equal(b["factor"], b["tokens"] * 10)  # columns aligned with tokens
            assert torch.equal(twin.next_batch(), b["tokens"])
        seen.append({int(b["tokens"][i, 0]) for b in batches for i in range(3)})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(24))


def test_dataset_loader_resume_exact_across_epochs() -> None:
    windows = sharded_windows([4, 6])  # 10 windows, mbs 2 -> 5 batches per epoch
    straight = take(DistributedBatchLoader(windows, "train", 2, 0, 1, seed=3), 13)
    first = DistributedBatchLoader(windows, "train", 2, 0, 1, seed=3)
    take(first, 7)
    resumed = DistributedBatchLoader(windows, "train", 2, 0, 1, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert_same_batches(take(resumed, 6), straight[7:])


def test_dataset_windows_unknown_column_and_empty_train() -> None:
    windows = sharded_windows([2])
    with pytest.raises(ValueError, match="unknown columns"):
        windows.gather("train", np.arange(2), ("nope",))
    with pytest.raises(ConfigError, match=r"^data\.seq_len: 50 leaves no training window"):
        DatasetWindows(
            {"train": [{"tokens": np.zeros(10, np.uint16)}], "val": []}, 50)
