"""Tests of the metric sinks: Parquet rows and TensorBoard events written, read back for real.

Values logged to TensorBoard are stored as float32, so the tests use values exactly
representable in float32 (k / 4) wherever TensorBoard is checked.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
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
    # metrics.parquet is a directory of parts: nothing else in the run directory, and no
    # temporary file left among the parts.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.parquet"]
    assert sorted(p.name for p in metrics_path(tmp_path).iterdir()) == [
        "part-00000000-schema.parquet",
        "part-00000001.parquet",
    ]


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


# ---------------------------------------------------------------------- parts format
# metrics.parquet is a directory of part files; these tests use tiny parts
# (rows_per_part) so that a few dozen steps span many parts.

REPO_ROOT = Path(__file__).resolve().parents[2]


def part_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in metrics_path(run_dir).iterdir())


def read_three_ways(run_dir: Path) -> pa.Table:
    """The table as pq.read_table, pd.read_parquet and read_metrics see it (all equal)."""
    path = metrics_path(run_dir)
    by_pyarrow = pq.read_table(path)
    by_pandas = pd.read_parquet(path)
    by_reader = read_metrics(run_dir)
    assert by_pyarrow.equals(by_reader)
    assert list(by_pandas.columns) == by_pyarrow.column_names
    pd.testing.assert_frame_equal(by_pandas, by_pyarrow.to_pandas())
    return by_pyarrow


def test_late_columns_are_read_back_by_pyarrow_pandas_and_read_metrics(tmp_path: Path) -> None:
    # 30 steps in parts of 4 rows: eval/loss first appears at step 25 (part 7), interp/*
    # at the end; dataset discovery alone would take the columns of part 1 only.
    w = MetricsWriter(tmp_path, tensorboard=False, flush_every=3, rows_per_part=4)
    for step in range(1, 31):
        scalars = {"train/task_loss": step / 4}
        if step % 25 == 0:
            scalars["eval/loss"] = 100 + step
        w.log(step, step * 10, scalars)
    w.flush()
    # Mid-run (not closed): the late column is already there.
    assert read_three_ways(tmp_path).column_names == ["step", "tokens", "train/task_loss", "eval/loss"]
    w.log(30, 300, {"interp/blocks.0.mlp/dead_fraction": 0.5})
    w.close()

    assert len(part_names(tmp_path)) == 1 + 8  # the schema part and ceil(30 / 4) parts
    table = read_three_ways(tmp_path)
    assert table.column_names == [
        "step",
        "tokens",
        "train/task_loss",
        "eval/loss",
        "interp/blocks.0.mlp/dead_fraction",
    ]
    for tag in table.column_names[2:]:
        assert table.schema.field(tag).type == pa.float64()
    assert table["step"].to_pylist() == list(range(1, 31))
    assert table["tokens"].to_pylist() == [s * 10 for s in range(1, 31)]
    assert table["train/task_loss"].to_pylist() == [s / 4 for s in range(1, 31)]
    assert table["eval/loss"].to_pylist() == [None] * 24 + [125.0] + [None] * 5
    assert table["interp/blocks.0.mlp/dead_fraction"].to_pylist() == [None] * 29 + [0.5]


def test_log_at_a_step_already_flushed_merges_into_its_row(tmp_path: Path) -> None:
    # flush_every=1: the second call at a step always comes after its row was written,
    # also when that row filled a part (steps 4, 8) or sits in a part sealed long ago.
    with MetricsWriter(tmp_path, tensorboard=False, flush_every=1, rows_per_part=4) as w:
        for step in range(1, 13):
            w.log(step, step, {"train/task_loss": float(step)})
            if step % 4 == 0:
                w.log(step, step, {"eval/loss": step / 4})
        w.log(2, 2, {"eval/loss": 0.5})  # going back: part 1 is sealed and on disk
        w.log(0, 0, {"train/task_loss": 0.0})  # below every part
        w.log(6, 6, {"train/task_loss": 60.0})  # a later value wins

    table = read_three_ways(tmp_path)
    assert table.to_pydict() == {
        "step": list(range(0, 13)),
        "tokens": list(range(0, 13)),
        "train/task_loss": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 60.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0],
        "eval/loss": [None, None, 0.5, None, 1.0, None, None, None, 2.0, None, None, None, 3.0],
    }
    assert part_names(tmp_path) == ["part-00000000-schema.parquet"] + [
        f"part-{i:08d}.parquet" for i in (1, 2, 3)
    ]


@pytest.mark.parametrize("resume_step", [0, 8, 9, 13, 25])
def test_resume_drops_rows_after_resume_step_across_parts(tmp_path: Path, resume_step: int) -> None:
    # 20 steps in parts of 4 rows (parts 1..5); 8 ends a part, 9 and 13 are inside one,
    # 25 is after the end.
    with MetricsWriter(tmp_path, tensorboard=False, flush_every=3, rows_per_part=4) as w:
        for step in range(1, 21):
            scalars = {"train/task_loss": float(step)}
            if step == 18:
                scalars["eval/loss"] = 1.0  # a column whose only value is dropped
            w.log(step, step * 10, scalars)
    with MetricsWriter(
        tmp_path, tensorboard=False, resume_step=resume_step, flush_every=3, rows_per_part=4
    ) as w:
        for step in range(resume_step + 1, resume_step + 8):
            w.log(step, step * 10, {"train/task_loss": 1000.0 + step})

    kept = list(range(1, min(resume_step, 20) + 1))
    redone = list(range(resume_step + 1, resume_step + 8))
    table = read_three_ways(tmp_path)
    # As before the parts format, columns seen before the restart stay, even where their
    # only value was dropped.
    assert table.to_pydict() == {
        "step": kept + redone,
        "tokens": [s * 10 for s in kept + redone],
        "train/task_loss": [float(s) for s in kept] + [1000.0 + s for s in redone],
        "eval/loss": [1.0 if s == 18 else None for s in kept] + [None] * len(redone),
    }
    # Parts never hold overlapping step ranges, and the ones after the cut are gone.
    for name in part_names(tmp_path)[1:]:
        assert pq.read_metadata(metrics_path(tmp_path) / name).num_rows <= 4


def test_fresh_run_in_used_directory_starts_empty(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False, flush_every=1, rows_per_part=2) as w:
        for step in range(1, 10):
            w.log(step, step, {"train/task_loss": 1.0, "eval/loss": 2.0})
    assert len(part_names(tmp_path)) == 1 + 5

    w = MetricsWriter(tmp_path, tensorboard=False, rows_per_part=2)
    # The old table is discarded on open, not at the first flush.
    assert not metrics_path(tmp_path).exists()
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path)
    w.log(1, 7, {"train/task_loss": 3.0})
    w.close()
    assert read_three_ways(tmp_path).to_pydict() == {"step": [1], "tokens": [7], "train/task_loss": [3.0]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.parquet"]


def write_single_file_table(run_dir: Path, num_steps: int) -> None:
    """A table as the previous MetricsWriter wrote it: one Parquet file, metrics.parquet."""
    steps = list(range(1, num_steps + 1))
    pq.write_table(
        pa.table(
            {
                "step": pa.array(steps, pa.int64()),
                "tokens": pa.array([s * 10 for s in steps], pa.int64()),
                "train/task_loss": pa.array([s / 4 for s in steps], pa.float64()),
                "eval/loss": pa.array([1.5 if s == 5 else None for s in steps], pa.float64()),
            }
        ),
        metrics_path(run_dir),
    )


@pytest.mark.parametrize("interrupted", [False, True])
def test_resume_run_with_single_file_table_of_previous_format(tmp_path: Path, interrupted: bool) -> None:
    write_single_file_table(tmp_path, 11)
    if interrupted:
        # What a writer killed between the two renames of the conversion leaves: the old
        # file moved aside, the new directory not yet in place.
        os.rename(metrics_path(tmp_path), tmp_path / ".metrics.parquet.legacy")
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=9, rows_per_part=4) as w:
        w.log(10, 100, {"train/task_loss": 10.0, "perf/tokens_per_sec": 5.0})

    assert metrics_path(tmp_path).is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.parquet"]
    assert read_three_ways(tmp_path).to_pydict() == {
        "step": list(range(1, 11)),
        "tokens": [s * 10 for s in range(1, 11)],
        "train/task_loss": [s / 4 for s in range(1, 10)] + [10.0],
        "eval/loss": [None] * 4 + [1.5] + [None] * 5,
        "perf/tokens_per_sec": [None] * 9 + [5.0],
    }


def test_fresh_run_over_single_file_table_of_previous_format(tmp_path: Path) -> None:
    write_single_file_table(tmp_path, 5)
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(1, 1, {"a/x": 1.0})
    assert read_three_ways(tmp_path).to_pydict() == {"step": [1], "tokens": [1], "a/x": [1.0]}


def changed_files(before: dict, after: dict) -> list[str]:
    return [name for name, stat in after.items() if before.get(name) != stat]


def dir_state(path: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (inode, size, mtime) of each file: a file written (os.replace'd) since an
    earlier state differs in its inode at least."""
    if not path.is_dir():
        return {}
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()}


def test_flush_work_does_not_grow_with_the_number_of_rows(tmp_path: Path) -> None:
    # Not a timing: count the files each flush writes and the rows in them. The previous
    # writer rewrote every row on every flush (here: 4 rows more each time).
    rows_per_part, flush_rows, num_flushes = 16, 4, 400
    w = MetricsWriter(tmp_path, tensorboard=False, flush_every=10**9, rows_per_part=rows_per_part)
    path = metrics_path(tmp_path)
    files_per_flush, rows_per_flush = [], []
    for flush in range(num_flushes):
        for k in range(flush_rows):
            step = flush * flush_rows + k + 1
            w.log(step, step, {f"train/t{i}": step + i / 8 for i in range(30)})
        before = dir_state(path)
        w.flush()
        written = changed_files(before, dir_state(path))
        files_per_flush.append(len(written))
        rows_per_flush.append(sum(pq.read_metadata(path / name).num_rows for name in written))
        # Rows held in memory are bounded too (the tail part, plus the sealed ones of a flush).
        assert sum(len(part) for part in w._table._held) <= rows_per_part + flush_rows
    w.close()

    assert read_metrics(tmp_path).num_rows == num_flushes * flush_rows  # 1,600 rows, 100 parts
    assert len(part_names(tmp_path)) == 1 + num_flushes * flush_rows // rows_per_part
    assert files_per_flush[0] == 2  # the schema part and part 1
    assert max(files_per_flush[1:]) == 1
    assert max(rows_per_flush) == rows_per_part
    # The same work per flush after 1,500 rows as after the first 16 rows.
    cycle = rows_per_part // flush_rows
    assert rows_per_flush[-cycle:] == rows_per_flush[:cycle] == [4, 8, 12, 16]
    assert sum(rows_per_flush[-40:]) == sum(rows_per_flush[:40])


# ---------------------------------------------------------------------- crash safety
# A real child process logs and flushes in a loop and is killed with SIGKILL mid-flush:
# either by this process right after the child announces a flush, or by the child itself
# on its N-th os.replace (the moment after a part's temporary file is complete and before
# it is moved into place). Each child resumes from the last flush the previous one
# finished, as the trainer resumes from a checkpoint (it flushes right after saving one).

CHILD = r"""
import os, signal, sys
run_dir, done, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode.startswith("replace:"):
    die_at, calls, real_replace = int(mode.split(":")[1]), [0], os.replace
    def replace(src, dst):
        calls[0] += 1
        if calls[0] == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    os.replace = replace
from tti_dist.metrics import MetricsWriter
w = MetricsWriter(run_dir, tensorboard=False, resume_step=done if done else None,
                  flush_every=10**9, rows_per_part=5)
for step in range(done + 1, done + 1500):  # finite: a child that is not killed fails the test
    w.log(step, step * 10, {"train/loss": step / 2})
    if step % 5 == 0:
        w.log(step, step * 10, {"eval/loss": step / 4 + 1000})
    if step % 7 == 0:
        w.log(step, step * 10, {f"late/{step // 7}": float(step)})  # a new column
    if step % 3 == 0:
        print("F", flush=True)
        w.flush()
        print("D", step, flush=True)
"""


def expected_tags(step: int) -> dict[str, float]:
    tags = {"train/loss": step / 2}
    if step % 5 == 0:
        tags["eval/loss"] = step / 4 + 1000
    if step % 7 == 0:
        tags[f"late/{step // 7}"] = float(step)
    return tags


def check_crashed_table(run_dir: Path, done: int) -> None:
    """Every row up to the last finished flush, exactly as logged; nothing torn or doubled."""
    if not metrics_path(run_dir).exists():
        # Killed inside the first flush: as before any flush, there is no table yet.
        assert done == 0
        with pytest.raises(FileNotFoundError):
            read_metrics(run_dir)
        return
    table = read_three_ways(run_dir)
    steps = table["step"].to_pylist()
    assert steps[:done] == list(range(1, done + 1))
    # Rows of the flush that was cut short may be there, but whole, in order, no duplicate.
    assert steps == list(range(1, len(steps) + 1))
    names = table.column_names
    first_seen = []
    for step in range(1, done + 1):
        first_seen += [tag for tag in expected_tags(step) if tag not in first_seen]
    assert names[: 2 + len(first_seen)] == ["step", "tokens", *first_seen]
    for row in table.to_pylist():
        step = row.pop("step")
        assert row.pop("tokens") == step * 10
        assert {tag: v for tag, v in row.items() if v is not None} == expected_tags(step)


def test_sigkill_mid_flush_leaves_a_readable_table_with_every_flushed_row(tmp_path: Path) -> None:
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    modes = [f"replace:{n}" for n in (1, 2, 3, 4, 6, 9)] + ["signal"] * 10
    done = 0
    for mode in modes:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), str(done), mode],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        lines = []
        try:
            if mode == "signal":
                target = rng.randint(1, 6)  # kill during the target-th flush of this child
                announced = 0
                while announced < target:
                    line = child.stdout.readline()
                    assert line, "child ended before it was killed"
                    lines.append(line)
                    announced += line == "F\n"
                time.sleep(rng.uniform(0, 0.002))
                child.send_signal(signal.SIGKILL)
            lines += child.stdout.read().splitlines(keepends=True)
            assert child.wait(timeout=120) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
        finished = [int(line.split()[1]) for line in lines if line.startswith("D ")]
        done = max(finished, default=done)
        if mode.startswith("replace:"):
            # The child died between writing a temporary file and moving it into place
            # (in metrics.parquet/, or in the hidden directory the first flush builds).
            assert list(tmp_path.rglob(".*.tmp"))
        check_crashed_table(tmp_path, done)
    assert done >= 30  # the children got well past their first flushes

    # The next writer cleans up, drops the unfinished flush's rows and carries on.
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=done, rows_per_part=5) as w:
        w.log(done + 1, (done + 1) * 10, expected_tags(done + 1))
    check_crashed_table(tmp_path, done + 1)
    assert read_metrics(tmp_path).num_rows == done + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.parquet"]
    assert not [p.name for p in metrics_path(tmp_path).iterdir() if p.name.startswith(".")]


WRITE_FAILURE_CHILD = r"""
import resource, signal, sys
from tti_dist.errors import RunWriteError
from tti_dist.metrics import MetricsWriter

run_dir, limit = sys.argv[1], int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails (EFBIG) instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
writer = MetricsWriter(run_dir, tensorboard=False, flush_every=10, rows_per_part=100_000)
try:
    for step in range(1, 100_000):
        writer.log(step, step * 10, {f"train/t{i:03d}": step + i / 1000 for i in range(60)})
        if step % 10 == 0:
            print("flushed", step, flush=True)
except RunWriteError as exc:
    print("error", exc, flush=True)
"""


def test_failed_write_names_the_path_and_keeps_the_flushed_rows(tmp_path: Path) -> None:
    """A real file-size limit (RLIMIT_FSIZE, as on a full disk): the part that outgrows it
    cannot be written; the error is one line naming the file and the OS's reason, and the
    table on disk still holds every row of the last successful flush."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", WRITE_FAILURE_CHILD, str(tmp_path), "60000"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    error = lines[-1]
    assert error.startswith(f"error {metrics_path(tmp_path)}/"), error
    assert error.endswith("could not write metrics: [Errno 27] File too large")
    flushed = max(int(line.split()[1]) for line in lines if line.startswith("flushed"))
    assert flushed >= 10
    table = read_metrics(tmp_path)
    assert table.column("step").to_pylist() == list(range(1, flushed + 1))
    assert not list(tmp_path.rglob(".*.tmp"))
