"""Reading a sweep directory: the trial records `tti sweep --out DIR` leaves as one table.

Each trial leaves DIR/runs/<trial>/trial.json (docs/sweeps.md); `collect_trials` reads them
all into one row per trial, with the trial's final scalars widened by `derived_metrics`, the
metrics that compare across model sizes (docs/report.md, "Derived metrics").
`eval_loss_history` reads one column of a trial's metrics table, DIR/runs/<trial>/metrics.parquet
(the convergence checks of tti_dist/report/noise.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tti_dist.errors import ConfigError

logger = logging.getLogger(__name__)

METRICS_TABLE = "metrics.parquet"
"""The metrics table in a run directory (tti_dist.metrics.metrics_table.PARQUET_NAME: a
directory of Parquet parts whose zero-row schema part sorts first, or one file for older runs).
Named here rather than imported: tti_dist.metrics and tti_dist.rundir load torch, and the
report reads files only."""


def _number(value, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if kind is int:
        return int(value) if float(value).is_integer() else None
    return float(value)


def _axis_text(value) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


_BLOCK_SITE = re.compile(r"^interp/blocks\.(\d+)\.(.+)$")

LAST_BLOCK = "blocks.last"
"""Site prefix of the derived metrics of each trial's last block (models differ in depth)."""


def derived_metrics(final: dict) -> dict[str, float]:
    """Metrics that compare across model sizes, computed from a trial's final scalars:

    - interp/<site>/l0_frac = l0 / num_units (the share of the site's units active per token;
      l0 itself grows with width);
    - interp/blocks.last.<rest> = interp/blocks.<L>.<rest> for the trial's deepest block L
      (a 2-layer and a 4-layer model have no block index in common at the top)."""
    out: dict[str, float] = {}
    for tag, value in final.items():
        if tag.startswith("interp/") and tag.endswith("/l0"):
            units = final.get(tag[: -len("l0")] + "num_units")
            if isinstance(units, (int, float)) and units > 0 and isinstance(value, (int, float)):
                out[tag + "_frac"] = float(value) / float(units)
    merged = {**final, **out}
    blocks = [int(m.group(1)) for t in merged if (m := _BLOCK_SITE.match(t))]
    if blocks:
        last = max(blocks)
        for tag, value in merged.items():
            m = _BLOCK_SITE.match(tag)
            if m and int(m.group(1)) == last:
                out[f"interp/{LAST_BLOCK}.{m.group(2)}"] = value
    return out


def _read_trials(sweep_dir: str | Path) -> list[dict]:
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ConfigError(f"DIR: '{sweep_dir}' does not exist or is not a directory")
    files = sorted(root.glob("runs/*/trial.json"))
    if not files:
        raise ConfigError(f"DIR: '{sweep_dir}' holds no trials (no runs/*/trial.json); "
                          "is it a tti sweep --out directory?")
    records = []
    for path in files:
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}: must hold a JSON object (a trial record), got {type(record).__name__}")
        record.setdefault("trial", path.parent.name)
        final = record.get("final")
        if isinstance(final, dict):
            record["final"] = {**final, **derived_metrics(final)}
        records.append(record)
    return records


def collect_trials(sweep_dir: str | Path) -> pa.Table:
    """One row per DIR/runs/*/trial.json (sorted by run directory).

    Columns: trial, model_size, setting (strings), seed, num_params, tokens, steps (int64; the
    last training step), status,
    error (strings), baseline (bool: every regularizer coefficient is 0, or there is none, and
    the model has no architectural sparsity option: the record's "sparsity_options" is empty),
    `axis/<key>` for every sweep axis (the value as text: JSON for numbers and booleans),
    `coeff/<name>` for every regularizer coefficient, and every key of the trial's "final"
    scalars as a float64 column (`eval/loss`, `interp/<site>/<metric>`, ...). Values a trial
    lacks are null.
    """
    records = _read_trials(sweep_dir)
    axes = sorted({k for r in records for k in (r.get("axes") or {})})
    coeffs = sorted({k for r in records for k in (r.get("coefficients") or {})})
    finals = sorted({k for r in records for k in (r.get("final") or {})})
    columns: dict[str, list] = {k: [] for k in ("trial", "model_size", "setting", "seed", "num_params", "tokens",
                                                "steps", "status", "error", "baseline")}
    columns.update({f"axis/{k}": [] for k in axes})
    columns.update({f"coeff/{k}": [] for k in coeffs})
    columns.update({k: [] for k in finals})
    for r in records:
        c = r.get("coefficients") or {}
        a = r.get("axes") or {}
        f = r.get("final") or {}
        columns["trial"].append(str(r["trial"]))
        columns["model_size"].append(None if r.get("model_size") is None else str(r["model_size"]))
        columns["setting"].append(None if r.get("setting") is None else str(r["setting"]))
        for key in ("seed", "num_params", "tokens", "steps"):
            columns[key].append(_number(r.get(key), int))
        columns["status"].append(None if r.get("status") is None else str(r["status"]))
        columns["error"].append(None if r.get("error") is None else str(r["error"]))
        columns["baseline"].append(all(_number(v, float) == 0.0 for v in c.values())
                                   and not r.get("sparsity_options"))
        for k in axes:
            columns[f"axis/{k}"].append(_axis_text(a.get(k)))
        for k in coeffs:
            columns[f"coeff/{k}"].append(_number(c.get(k), float))
        for k in finals:
            columns[k].append(_number(f.get(k), float))
    types = {"seed": pa.int64(), "num_params": pa.int64(), "tokens": pa.int64(), "steps": pa.int64(),
             "baseline": pa.bool_()}
    fields = []
    for name in columns:
        if name in types:
            fields.append(pa.field(name, types[name]))
        elif name.startswith("coeff/") or name in finals:
            fields.append(pa.field(name, pa.float64()))
        else:
            fields.append(pa.field(name, pa.string()))
    return pa.table(columns, schema=pa.schema(fields))


def eval_loss_history(run_dir: str | Path, tag: str = "eval/loss") -> list[tuple[int, float]]:
    """The (step, value) points of one tag in a run directory's metrics table, in step order
    ([] when the run has no table or never logged the tag).

    Reads only the `step` and `tag` columns, and only the rows where the tag was logged (a
    filter on its validity), so a long run costs two narrow column reads, not the table.
    An unreadable table is logged and read as [] (the report goes on without it).
    """
    path = Path(run_dir) / METRICS_TABLE
    if not path.exists():
        return []
    try:
        # Dataset discovery takes the schema from the first file: the schema part, which
        # holds every column (tti_dist/metrics/metrics_table.py).
        table = pq.read_table(path, columns=["step", tag], filters=pc.field(tag).is_valid())
    except (pa.ArrowInvalid, KeyError) as exc:
        if tag in str(exc) and "No match for FieldRef" in str(exc):
            return []  # the run never logged the tag
        logger.warning("%s: cannot read %s (%s)", path, tag, str(exc).splitlines()[0])
        return []
    except OSError as exc:
        logger.warning("%s: cannot read %s (%s)", path, tag, str(exc).splitlines()[0])
        return []
    steps, values = table.column("step").to_pylist(), table.column(tag).to_pylist()
    return sorted((int(s), float(v)) for s, v in zip(steps, values) if s is not None)
