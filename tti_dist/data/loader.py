"""Fixed-length windows over token data, and an exact, resumable per-rank loader.

Sequence packing: documents are stored back to back, separated by EOS, and cut into
non-overlapping windows of `seq_len + 1` tokens (inputs are the first `seq_len`, targets
the last `seq_len`), so no token is padding. Two window sources:
- `DatasetWindows` over a built Arrow dataset (tti_dist.data.dataset_reader): train and val
  splits come from the dataset; windows never cross shard boundaries (each shard's tail of
  fewer than seq_len + 1 tokens is dropped), and extra per-token columns (ground-truth
  factors) are cut into the same windows as the tokens.
- `TokenWindows` over one in-memory token array, holding out its end as validation.

`DistributedBatchLoader` gives one data-parallel rank its micro-batches. All ranks walk the
same epoch order (a permutation seeded by `[seed, epoch]`, so no communication is needed);
each global micro-step takes `micro_batch_size * dp_size` consecutive windows of that order
and DP rank r reads the r-th contiguous slice of them. Tensor-parallel ranks of one DP rank
pass the same `dp_rank` and therefore read identical batches, which tensor parallelism
requires. An epoch's tail that cannot fill a whole global micro-step is dropped, so every
rank always gets a full batch and all ranks change epoch at the same step.

The loader's whole position is two ints (epoch, index within the epoch), so a checkpoint
can store it and a resumed run continues with exactly the batch an uninterrupted run would
have read next.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch

from tti_dist.errors import ConfigError

logger = logging.getLogger(__name__)

Split = Literal["train", "val"]
_SPLITS = ("train", "val")


class TokenWindows:
    """Non-overlapping `seq_len + 1`-token windows of a 1-D token array, split into train and val.

    The last partial window is dropped. The LAST `max(1, round(val_fraction * n))` of the
    `n` windows form the validation split; the rest are the train split. Windows are views
    into the token array (read-only), so no token is copied until a batch is gathered.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float) -> None:
        """Cut `tokens` into windows; raise ConfigError when the train split would be empty."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        if seq_len < 1:
            raise ConfigError(f"data.seq_len: {seq_len!r} is not allowed; use a positive number of tokens")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: {val_fraction!r} is not allowed; use a value in [0, 1)")
        self.seq_len = seq_len
        self.val_fraction = val_fraction
        window_len = seq_len + 1
        num_windows = len(tokens) // window_len
        num_val = max(1, round(val_fraction * num_windows))
        num_train = num_windows - num_val
        if num_train < 1:
            raise ConfigError(
                f"data.val_fraction={val_fraction} / data.seq_len={seq_len}: {len(tokens)} tokens "
                f"make {num_windows} windows of {window_len} tokens, {num_val} of them validation, "
                f"leaving no training window; lower data.seq_len or data.val_fraction, "
                f"or raise data.max_bytes"
            )
        windows = tokens[: num_windows * window_len].reshape(num_windows, window_len)
        # A read-only view: batches are gathered from it by fancy indexing (which copies only
        # the batch), and nothing downstream may write into the shared corpus.
        windows.flags.writeable = False
        self._windows = windows
        self._num_train = num_train
        self._num_val = num_val

    @property
    def num_train_windows(self) -> int:
        """Windows in the train split."""
        return self._num_train

    @property
    def num_val_windows(self) -> int:
        """Windows in the validation split."""
        return self._num_val

    def num_windows(self, split: Split) -> int:
        """Windows in `split` ("train" or "val")."""
        return self._num_train if _check_split(split) == "train" else self._num_val

    def split_windows(self, split: Split) -> np.ndarray:
        """Read-only `[num_windows(split), seq_len + 1]` view of a split's windows."""
        if _check_split(split) == "train":
            return self._windows[: self._num_train]
        return self._windows[self._num_train :]

    @property
    def column_names(self) -> tuple[str, ...]:
        """Extra per-token columns (none for a bare token array)."""
        return ()

    def gather(self, split: Split, rows: np.ndarray, columns: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """Windows `rows` of `split` as {"tokens": [len(rows), seq_len + 1]}."""
        if columns:
            raise ValueError(f"a bare token array has no columns {columns}")
        return {"tokens": self.split_windows(split)[rows]}

    def train_window(self, i: int) -> np.ndarray:
        """The i-th train window (`seq_len + 1` tokens, read-only view)."""
        return self._windows[_check_index(i, self._num_train, "train")]

    def val_window(self, i: int) -> np.ndarray:
        """The i-th validation window (`seq_len + 1` tokens, read-only view)."""
        return self._windows[self._num_train + _check_index(i, self._num_val, "val")]


class DatasetWindows:
    """`seq_len + 1`-token windows over the shards of a built dataset, per split.

    `shards` maps a split name to its shards, each a dict of equally long 1-D column arrays
    (`tokens` plus extra columns), as `TokenDataset.split_shards` returns them: memory-mapped
    views, so a window is read from disk only when a batch gathers it. Window w of a split
    is window (w - start_s) of the shard s whose range contains w.
    """

    def __init__(self, shards: dict[str, list[dict[str, np.ndarray]]], seq_len: int) -> None:
        if seq_len < 1:
            raise ConfigError(f"data.seq_len: {seq_len!r} is not allowed; use a positive number of tokens")
        self.seq_len = seq_len
        self._views: dict[str, list[dict[str, np.ndarray]]] = {}
        self._starts: dict[str, np.ndarray] = {}
        names: set[tuple[str, ...]] = set()
        for split in _SPLITS:
            views, counts = [], []
            for shard in shards.get(split, []):
                n = len(shard["tokens"]) // (seq_len + 1)
                if n == 0:
                    continue
                views.append({k: v[: n * (seq_len + 1)].reshape(n, seq_len + 1) for k, v in shard.items()})
                counts.append(n)
                names.add(tuple(sorted(k for k in shard if k != "tokens")))
            self._views[split] = views
            self._starts[split] = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        if len(names) > 1:
            raise ValueError(f"shards disagree on their columns: {sorted(names)}")
        self._columns = next(iter(names), ())
        if self.num_windows("train") == 0:
            raise ConfigError(
                f"data.seq_len: {seq_len} leaves no training window (every train shard has fewer "
                f"than {seq_len + 1} tokens); lower data.seq_len or use more data"
            )

    @property
    def column_names(self) -> tuple[str, ...]:
        """Extra per-token columns available to `gather`."""
        return self._columns

    def num_windows(self, split: Split) -> int:
        """Windows in `split`."""
        return int(self._starts[_check_split(split)][-1])

    def gather(self, split: Split, rows: np.ndarray, columns: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """Windows `rows` (split-global indices) as {"tokens": [len(rows), seq_len + 1], column: ...}."""
        unknown = [c for c in columns if c not in self._columns]
        if unknown:
            raise ValueError(f"unknown columns {unknown}; the dataset has {list(self._columns)}")
        starts, views = self._starts[split], self._views[split]
        shard_of = np.searchsorted(starts, rows, side="right") - 1
        out = {}
        for name in ("tokens", *columns):
            out[name] = np.stack([views[s][name][r - starts[s]] for s, r in zip(shard_of, rows)]) if len(rows) else \
                np.empty((0, self.seq_len + 1), dtype=views[0][name].dtype)
        return out


class DistributedBatchLoader:
    """Micro-batches of one split for one data-parallel rank; exact and resumable.

    Each `next_batch` is one global micro-step: the next `micro_batch_size * dp_size`
    windows of the epoch order, of which this rank takes `[dp_rank * mbs, (dp_rank + 1) * mbs)`.
    The epoch order is `np.random.default_rng([seed, epoch]).permutation(n)` when `shuffle`,
    else `arange(n)`; windows left over at the end of an epoch that cannot fill a whole
    global micro-step are skipped. The loader never stops: after the last batch of an epoch
    the next epoch begins.
    """

    def __init__(
        self,
        windows: TokenWindows | DatasetWindows,
        split: Split,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        """Set up the loader at epoch 0, index 0; raise ConfigError when a split is too small."""
        _check_split(split)
        if micro_batch_size < 1:
            raise ConfigError(
                f"train.micro_batch_size: {micro_batch_size!r} is not allowed; use a positive integer"
            )
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} and dp_size={dp_size} must satisfy 0 <= dp_rank < dp_size")
        if seed < 0:
            # SeedSequence entropy must be non-negative.
            raise ConfigError(f"train.seed: {seed!r} is not allowed; use a non-negative integer")
        self.windows = windows
        self.split = split
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self._num_windows = windows.num_windows(split)
        self._global_batch = micro_batch_size * dp_size
        if self._num_windows < self._global_batch:
            raise ConfigError(
                f"train.micro_batch_size: {micro_batch_size} x data-parallel size {dp_size} = "
                f"{self._global_batch} windows per micro-step, but the {split} split has only "
                f"{self._num_windows} windows of data.seq_len+1={windows.seq_len + 1} tokens; "
                f"lower train.micro_batch_size or data.seq_len, or use more data (data.max_bytes)"
                + (" or data.val_fraction" if split == "val" else "")
            )
        self._batches_per_epoch = self._num_windows // self._global_batch
        self._epoch = 0
        self._index = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None
        logger.debug(
            "%s loader: %d windows, %d batches/epoch, dp %d/%d, mbs %d, shuffle=%s",
            split, self._num_windows, self._batches_per_epoch, dp_rank, dp_size,
            micro_batch_size, shuffle,
        )

    @property
    def batches_per_epoch(self) -> int:
        """Global micro-steps (so batches per rank) in one epoch."""
        return self._batches_per_epoch

    @property
    def epoch(self) -> int:
        """Epoch of the next batch's position (it rolls over lazily at the next `next_batch`)."""
        return self._epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Window order of an epoch, cached because every batch of the epoch reads it."""
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self._num_windows)
            else:
                self._order = np.arange(self._num_windows)
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def _batch_at(self, order: np.ndarray, index: int, columns: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """This rank's slice of global micro-step `index` of a window order, as int64 tensors."""
        start = index * self._global_batch + self.dp_rank * self.micro_batch_size
        rows = order[start : start + self.micro_batch_size]
        # Only the batch's rows are gathered (copied); int64 is what embeddings and
        # cross-entropy take, and it holds the factor columns' -1 too.
        return {k: torch.from_numpy(v.astype(np.int64)) for k, v in self.windows.gather(self.split, rows, columns).items()}

    def _advance(self) -> tuple[np.ndarray, int]:
        if self._index >= self._batches_per_epoch:
            self._epoch += 1
            self._index = 0
        index = self._index
        self._index += 1
        return self._epoch_order(self._epoch), index

    def next_batch(self) -> torch.Tensor:
        """Next micro-batch of tokens: int64 `[micro_batch_size, seq_len + 1]`.

        Inputs are `batch[:, :-1]`, targets `batch[:, 1:]`.
        """
        return self._batch_at(*self._advance())["tokens"]

    def next_batch_columns(self, columns: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Next micro-batch with extra per-token columns: {"tokens": ..., column: ...}, each
        int64 `[micro_batch_size, seq_len + 1]`, aligned position by position."""
        return self._batch_at(*self._advance(), columns)

    def state_dict(self) -> dict[str, int]:
        """Position of the loader: `{"epoch": int, "index": int}` (index = batches taken this epoch)."""
        return {"epoch": int(self._epoch), "index": int(self._index)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position from `state_dict`; the next batch is the one that would have followed."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self._batches_per_epoch:
            raise ValueError(
                f"loader state epoch={epoch}, index={index} does not fit this loader "
                f"({self._batches_per_epoch} batches per epoch); was it saved with a different "
                f"micro_batch_size, dp_size or data config?"
            )
        self._epoch, self._index = epoch, index

    def fixed_batches(self, num_batches: int) -> list[torch.Tensor]:
        """This rank's slice of the first `num_batches` global micro-steps of the unshuffled split.

        Meant for the validation split: the same batches every time, independent of the
        loader's position and `shuffle`, so a validation loss compares across steps. Past
        the end of the split it wraps around exactly as an unshuffled loader would (the
        partial tail is skipped), so the result equals the first `num_batches` batches of a
        fresh `shuffle=False` loader.
        """
        return [batch["tokens"] for batch in self.fixed_batches_columns(num_batches, ())]

    def fixed_batches_columns(self, num_batches: int, columns: tuple[str, ...]) -> list[dict[str, torch.Tensor]]:
        """`fixed_batches` with extra per-token columns: each batch is {"tokens": ..., column: ...}
        (int64 `[micro_batch_size, seq_len + 1]`, aligned position by position), e.g. the
        synthetic corpus's ground-truth factors for a probe set."""
        if self.split != "val":
            raise ValueError("fixed_batches is for the validation split; this loader reads 'train'")
        if num_batches < 0:
            raise ValueError(f"num_batches must be >= 0, got {num_batches}")
        order = np.arange(self._num_windows)
        return [self._batch_at(order, k % self._batches_per_epoch, columns) for k in range(num_batches)]


def _check_split(split: str) -> str:
    """The split name, if it is one of "train"/"val"."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    return split


def _check_index(i: int, num: int, split: str) -> int:
    """The window index, if it lies in `[0, num)` (negative indices would silently cross splits)."""
    if not 0 <= i < num:
        raise IndexError(f"{split} window index {i} out of range [0, {num})")
    return i
