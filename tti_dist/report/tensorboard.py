"""A sweep in TensorBoard: the hparams record of each trial and a side-by-side layout.

Each trial of a sweep is an ordinary run directory under `OUT/runs/<trial>/`, and its
TensorBoard event files live in `OUT/runs/<trial>/tb/`, so `OUT/runs` is the logdir of the
whole sweep and every trial is one TensorBoard run (`<trial>/tb`). On top of the time
series the training loop writes, a finished trial gets two more records in that same
directory:

**hparams record** (`write_trial_hparams`). `SummaryWriter.add_hparams(..., run_name=".")`
writes the three hparams-plugin summaries (experiment, session start with the hparam
values, session end) into the trial's own tb dir, so the HPARAMS dashboard shows one
session per trial, named like its run (`<trial>/tb`), next to that run's curves. The
dashboard's metric columns are scalar tags: for each session it shows the value at the
highest step of the tag named in the experiment record, read from the session's run.
`add_hparams` writes each metric as such a scalar, so a metric named `eval/loss` would add
a point to the `eval/loss` time series the trial already has (a stray point at the step
given) and the dashboard would show whichever point has the highest step. Metric keys are
therefore written as `hparam/<tag>` (`hparam/eval/loss`): a tag of their own, one point,
the trial's final value.

The plugin takes the list of hparam and metric *columns* from one experiment record (the
first run it finds that has one), not from the union over runs, so every trial of a sweep
should be recorded with the same hparam names and metric keys (the sweep's axes are the
same for all trials). A metric that is NaN/inf in a trial is left out of that trial's
record (with a warning); if TensorBoard picks that trial's record, the column is missing
for all trials, which is the price of never showing a made-up value.

**custom scalars layout** (`write_sweep_layout`). The CUSTOM SCALARS dashboard draws
Multiline charts whose lines are every (run, tag) pair whose tag matches one of the chart's
regexes (Python `re.match`, so the regexes here are anchored at both ends). A chart with
the regex `^eval/loss$` therefore has one line per trial: the trials side by side.
`sweep_layout` groups the tags into three categories:

- "capability": `train/task_loss`, `eval/loss`, `eval/ppl`, and `eval/*/loss`,
  `eval/*/ppl` (other evaluation datasets, one line per dataset and trial);
- "interpretability": one chart per tag family `interp/*/<metric>`, `reg/*/<metric>`,
  `sae/*/<metric>`, `moe/*/<metric>`: the middle path component (the site, regularizer
  instance or MoE layer) is a wildcard, so a chart holds that metric for every site and
  every trial; a tag with no middle component (`moe/<metric>`) gets a chart of its own;
- "performance": one chart per `perf/*` tag.

Only families with at least one tag present are included. TensorBoard merges the layouts
of all runs by category title, dropping duplicate charts, so each trial can write the
layout of its own tags: the dashboard shows the union.

The server that shows a sweep (`tti tensorboard`) is tti_dist/report/tensorboard_server.py.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from pathlib import Path
from typing import Any, Mapping

from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger(__name__)

METRIC_PREFIX = "hparam/"
"""Prefix of the hparams metric tags (`hparam/eval/loss`), see the module docstring."""

# Tag families whose middle path component (site / regularizer instance / MoE layer) is
# wildcarded so that one chart compares the same metric across sites and trials.
_INTERP_PREFIXES = ("interp", "reg", "sae", "moe")
_CAPABILITY_TAGS = ("train/task_loss", "eval/loss", "eval/ppl")
_CAPABILITY_FAMILY_SUFFIXES = ("loss", "ppl")


# ---------------------------------------------------------------------------- hparams


def _hparam_value(value: Any) -> int | float | str:
    """An hparams-plugin value: int/float/str kept, bool and None and others as strings.

    Bools become "true"/"false": torch's add_hparams tests for int before bool, so a bool
    would be recorded as the number 1.0/0.0 and shown on a continuous axis.
    """
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        as_float = float(value)
        # The plugin serves values as JSON numbers; NaN/inf would not survive that.
        return as_float if math.isfinite(as_float) else str(as_float)
    return str(value)


def hparams_metric_tag(tag: str) -> str:
    """The tag under which the hparams record stores metric `tag` (`hparam/<tag>`)."""
    return tag if tag.startswith(METRIC_PREFIX) else METRIC_PREFIX + tag


def write_trial_hparams(
    tb_dir: str | Path,
    hparams: Mapping[str, Any],
    metrics: Mapping[str, float],
    *,
    step: int | None = None,
) -> None:
    """Write the hparams-plugin record of one trial into its run's TensorBoard directory.

    Args:
        tb_dir: the trial's TensorBoard directory (`OUT/runs/<trial>/tb`); the record goes
            into this same run (`run_name="."`).
        hparams: hparam name -> value (the trial's axis values). int/float/str are kept;
            bool becomes "true"/"false", None "none", anything else its str().
        metrics: tag -> final value (e.g. the trial's `final` dict). Stored under
            `hparam/<tag>`; NaN/inf values are dropped with a warning.
        step: step of the metric points (e.g. the trial's last step); default 0.
    """
    hp = {str(name): _hparam_value(value) for name, value in hparams.items()}
    values: dict[str, float] = {}
    dropped = []
    for tag, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"hparams metric {tag!r}: {value!r} is not a number") from exc
        if math.isfinite(number):
            values[hparams_metric_tag(str(tag))] = number
        else:
            dropped.append(f"{tag}={number}")
    if dropped:
        logger.warning("hparams record in %s: dropped non-finite metric(s) %s", tb_dir, ", ".join(dropped))
    writer = SummaryWriter(str(tb_dir))
    try:
        writer.add_hparams(hp, values, run_name=".", global_step=step)
    finally:
        writer.close()


# ---------------------------------------------------------------------------- layout


def _exact(tag: str) -> tuple[str, str]:
    """(chart title, regex) of a chart holding exactly `tag`."""
    return tag, f"^{re.escape(tag)}$"


def _family(tag: str) -> tuple[str, str]:
    """(chart title, regex) of the family of `tag` with its second component wildcarded.

    `interp/blocks.0.mlp.act/l0` -> ("interp/*/l0", r"^interp/[^/]+/l0$").
    """
    parts = tag.split("/")
    if len(parts) < 3:
        return _exact(tag)
    rest = "/".join(parts[2:])
    return f"{parts[0]}/*/{rest}", f"^{re.escape(parts[0])}/[^/]+/{re.escape(rest)}$"


def sweep_layout(tags: list[str]) -> dict:
    """Custom-scalars layout comparing all trials, in `SummaryWriter.add_custom_scalars` form.

    Returns `{category: {chart title: ["Multiline", [regex]]}}` with the categories
    "capability", "interpretability" and "performance" (see the module docstring); charts
    are sorted by title, and categories or charts without a matching tag are left out.
    """
    categories: dict[str, dict[str, str]] = {"capability": {}, "interpretability": {}, "performance": {}}
    for tag in sorted(set(tags)):
        parts = tag.split("/")
        if tag in _CAPABILITY_TAGS:
            category, (title, regex) = "capability", _exact(tag)
        elif parts[0] == "eval" and len(parts) == 3 and parts[2] in _CAPABILITY_FAMILY_SUFFIXES:
            category, (title, regex) = "capability", _family(tag)
        elif parts[0] in _INTERP_PREFIXES and len(parts) >= 2:
            category, (title, regex) = "interpretability", _family(tag)
        elif parts[0] == "perf" and len(parts) >= 2:
            category, (title, regex) = "performance", _exact(tag)
        else:
            continue
        categories[category][title] = regex
    return {
        category: {title: ["Multiline", [charts[title]]] for title in sorted(charts)}
        for category, charts in categories.items()
        if charts
    }


def write_sweep_layout(tb_dir: str | Path, tags: list[str]) -> None:
    """Write `sweep_layout(tags)` into a TensorBoard directory (e.g. a trial's tb dir).

    Writes nothing (and logs why) when none of the tags belongs to the layout.
    """
    layout = sweep_layout(tags)
    if not layout:
        logger.info("no capability/interpretability/performance tags among %d tag(s): no layout written to %s",
                    len(tags), tb_dir)
        return
    writer = SummaryWriter(str(tb_dir))
    try:
        writer.add_custom_scalars(layout)
    finally:
        writer.close()

