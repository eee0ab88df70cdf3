"""Tests of the metric sinks: Parquet rows and TensorBoard events written, read back for real.

Values logged to TensorBoard are stored as float32, so the tests use values exactly
representable in float32 (k / 4) wherever TensorBoard is checked.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tti_dist.metrics import (
    MetricsWriter,
    NullMetricsWriter,
    metrics_path,
    open_metrics_writer,
    read_metrics,
)


def tb_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of a tag as TensorBoard's own reader sees the run's tb/ directory."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_rows_types_nulls_and_column_order(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(1, 100, {"train/task_loss": 2.5, "perf/tokens_per_sec": 1000})
        w.log(2, 200, {"train/task_loss": torch.tensor(2.25), "eval/loss": np.float32(3.0)})
        w.log(3, 300, {"perf/tokens_per_sec": np.int64(7), "train/task_loss": float("nan")})

    table = read_metrics(tmp_path)
    assert table.column_names == [
        "step",
        "tokens",
        "train/task_loss",
        "perf/tokens_per_sec",
        "eval/loss",
    ]
    assert table.schema.field("step").type == pa.int64()
    assert table.schema.field("tokens").type == pa.int64()
    for tag in ("train/task_loss", "perf/tokens_per_sec", "eval/loss"):
        assert table.schema.field(tag).type == pa.float64()

    assert table["step"].to_pylist() == [1, 2, 3]
    assert table["tokens"].to_pylist() == [100, 200, 300]
    assert table["perf/tokens_per_sec"].to_pylist() == [1000.0, None, 7.0]
    assert table["eval/loss"].to_pylist() == [None, 3.0, None]
    loss = table["train/task_loss"].to_pylist()
    assert loss[:2] == [2.5, 2.25]
    # NaN is a value (the loss diverged), not a missing entry.
    assert loss[2] is not None and math.isnan(loss[2])
    assert table["train/task_loss"].null_count == 0


def test_two_log_calls_at_one_step_merge_into_one_row(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path) as w:
        w.log(10, 1000, {"train/task_loss": 1.5})
        w.log(10, 1000, {"eval/loss": 1.75})
        w.log(11, 1100, {"train/task_loss": 1.25})

    table = read_metrics(tmp_path)
    assert table.to_pydict() == {
        "step": [10, 11],
        "tokens": [1000, 1100],
        "train/task_loss": [1.5, 1.25],
        "eval/loss": [1.75, None],
    }
    assert tb_scalars(tmp_path, "eval/loss") == [(10, 1.75)]
    assert tb_scalars(tmp_path, "train/task_loss") == [(10, 1.5), (11, 1.25)]


def test_tensorboard_gets_same_tags_and_values(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, parquet=False) as w:
        for step in range(1, 6):
            w.log(step, step * 64, {"train/task_loss": step / 4, "perf/tokens_per_sec": 8.0})

    assert tb_scalars(tmp_path, "train/task_loss") == [(s, s / 4) for s in range(1, 6)]
    assert tb_scalars(tmp_path, "perf/tokens_per_sec") == [(s, 8.0) for s in range(1, 6)]
    assert not metrics_path(tmp_path).exists()


def test_resume_discards_rows_and_events_after_resume_step(tmp_path: Path) -> None:
    # The first run logs steps 1..10 and "crashes" after step 10.
    with MetricsWriter(tmp_path) as w:
        for step in range(1, 11):
            w.log(step, step * 10, {"train/task_loss": step / 4})
    # It resumes from the checkpoint at step 6 and redoes steps 7..9 with new values.
    with MetricsWriter(tmp_path, resume_step=6) as w:
        for step in range(7, 10):
            w.log(step, step * 10, {"train/task_loss": 100 + step / 4})

    expected = [(s, s / 4) for s in range(1, 7)] + [(s, 100 + s / 4) for s in range(7, 10)]
    table = read_metrics(tmp_path)
    assert table["step"].to_pylist() == list(range(1, 10))
    assert table["tokens"].to_pylist() == [s * 10 for s in range(1, 10)]
    assert table["train/task_loss"].to_pylist() == [v for _, v in expected]

    assert tb_scalars(tmp_path, "train/task_loss") == expected


def test_resume_keeps_columns_seen_before_the_restart(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(1, 10, {"train/task_loss": 1.0, "eval/loss": 2.0})
        w.log(2, 20, {"train/task_loss": 0.5})
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=2) as w:
        w.log(3, 30, {"train/task_loss": 0.25, "perf/tokens_per_sec": 9.0})

    assert read_metrics(tmp_path).to_pydict() == {
        "step": [1, 2, 3],
        "tokens": [10, 20, 30],
        "train/task_loss": [1.0, 0.5, 0.25],
        "eval/loss": [2.0, None, None],
        "perf/tokens_per_sec": [None, None, 9.0],
    }


def test_resume_without_existing_table_starts_empty(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=5) as w:
        w.log(6, 60, {"train/task_loss": 1.0})
    assert read_metrics(tmp_path).to_pydict() == {
        "step": [6],
        "tokens": [60],
        "train/task_loss": [1.0],
    }


def test_fresh_run_over_existing_dir_overwrites(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path) as w:
        for step in range(1, 6):
            w.log(step, step, {"train/task_loss": step / 4, "eval/loss": 1.0})
    with MetricsWriter(tmp_path) as w:
        for step in range(1, 3):
            w.log(step, step, {"train/task_loss": 10 + step / 4})

    assert read_metrics(tmp_path).to_pydict() == {
        "step": [1, 2],
        "tokens": [1, 2],
        "train/task_loss": [10.25, 10.5],
    }
    assert tb_scalars(tmp_path, "train/task_loss") == [(1, 10.25), (2, 10.5)]
    assert tb_scalars(tmp_path, "eval/loss") == []


def test_periodic_flush_is_atomic_and_leaves_no_tmp(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, tensorboard=False, flush_every=3)
    w.log(1, 1, {"a/x": 1.0})
    w.log(2, 2, {"a/x": 2.0})
    assert not metrics_path(tmp_path).exists()
    w.log(3, 3, {"a/x": 3.0})
    # The third call flushed on its own: a reader sees a complete table mid-run.
    assert read_metrics(tmp_path)["step"].to_pylist() == [1, 2, 3]
    w.log(4, 4, {"a/x": 4.0})
    w.close()
    assert read_metrics(tmp_path)["step"].to_pylist() == [1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["metrics.parquet"]


def test_close_is_idempotent_and_log_after_close_fails(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path)
    w.log(1, 1, {"a/x": 1.0})
    w.close()
    w.close()
    assert w.closed
    with pytest.raises(RuntimeError):
        w.log(2, 2, {"a/x": 2.0})
    assert read_metrics(tmp_path)["step"].to_pylist() == [1]


def test_out_of_order_steps_are_written_sorted(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(2, 20, {"a/x": 2.0})
        w.log(1, 10, {"a/x": 1.0})
    assert read_metrics(tmp_path).to_pydict() == {
        "step": [1, 2],
        "tokens": [10, 20],
        "a/x": [1.0, 2.0],
    }


def test_bad_values_and_tags_are_rejected(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(TypeError, match="train/vec"):
            w.log(1, 1, {"train/vec": torch.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            w.log(1, 1, {"step": 1.0})
    with pytest.raises(ValueError):
        MetricsWriter(tmp_path, flush_every=0)


def test_open_metrics_writer_non_writer_rank_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with open_metrics_writer(run_dir, is_writer_rank=False, resume_step=3) as w:
        assert isinstance(w, NullMetricsWriter)
        w.log(1, 1, {"a/x": 1.0})
        w.flush()
    assert w.closed
    assert not run_dir.exists()

    with open_metrics_writer(run_dir, is_writer_rank=True, tensorboard=False) as w:
        assert isinstance(w, MetricsWriter)
        w.log(1, 1, {"a/x": 1.0})
    assert read_metrics(run_dir)["a/x"].to_pylist() == [1.0]
