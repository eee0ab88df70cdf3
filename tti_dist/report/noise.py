"""The noise floor of the interpretability tax, and checks that its baselines converged.

A tax measured on a few seeds of short runs can be noise, or the gap between two curves
that had not yet flattened. This module says which, with pure functions over plain Python
data (per-seed numbers, `(step, loss)` histories), so that every rule can be checked on
hand-made numbers. tti_dist/report/pareto.py adds the noise floor to each tax row;
tti_dist/report/sweep_report.py reads the baselines' histories and collects the warnings.
docs/report.md, "Noise floor" and "Warnings", has the long form.

Noise floor of the tax, per model size s over its n seeds r (the tax is paired per seed:
each seed's regularized frontier minus that same seed's baseline):

    sd     = sqrt( sum_r (tax(s, r) - mean)^2 / (n - 1) )        (ddof = 1)
    SE     = sd / sqrt(n)                                        (standard error of the mean)
    t_crit = t(0.975, n - 1)                                     (Student's t quantile)
    distinguishable from zero  <=>  n >= 2 and |mean| > t_crit SE

t_crit SE is the half-width of the two-sided 95% confidence interval of the mean when sd is
itself estimated from the n seeds (Student 1908, "The probable error of a mean"): under the
null hypothesis mean = 0, mean / SE follows Student's t with n - 1 degrees of freedom, not a
normal. t_crit is 12.71 at n = 2, 4.30 at n = 3, 2.78 at n = 5 and tends to 1.96. A fixed
2 SE (the normal approximation) would call a zero tax real with probability P(|t_{n-1}| > 2):
30% at n = 2, 18% at n = 3, 12% at n = 5, not 5%, with the 2-5 seeds a sweep affords. With
one seed there is no spread to measure: "not measured: one seed".

Baseline spread, per size over the seeds r with a completed baseline (L_base(s, r), the
baseline loss the tax subtracts): the same sample sd (ddof = 1), its n and the relative
spread sd / mean. It is the run-to-run noise of eval/loss itself at that size.

Convergence of a baseline trial with eval/loss history (step_k, L_k) and final training
step T: with L_end the loss at the last eval step and L_ref the loss at the last eval step
at or before (1 - CONVERGENCE_WINDOW) T,

    drop = (L_ref - L_end) / L_ref

A size's baselines look unconverged when some baseline's drop exceeds CONVERGENCE_DROP
(still improving at the end, so a longer run would move the baseline and the tax), or
when their relative seed spread exceeds SEED_SPREAD.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95
"""Two-sided confidence level of the verdict: a tax is distinguishable from zero when its
CONFIDENCE interval, mean +- t(1 - (1 - CONFIDENCE) / 2, n - 1) SE, excludes zero."""

MIN_SEEDS = 2
"""Seeds needed to measure a spread at all (a sample sd needs two values)."""

CONVERGENCE_WINDOW = 0.2
"""The tail of training, as a share of the final step, over which a baseline's eval/loss
must have stopped falling: the last 20% of steps."""

CONVERGENCE_DROP = 0.02
"""Relative fall of a baseline's eval/loss over the last CONVERGENCE_WINDOW of its steps
above which it counts as unconverged: 2%."""

SEED_SPREAD = 0.02
"""Relative seed spread (sd / mean over seeds) of a size's baseline eval/loss above which its
baselines count as unconverged: 2%."""

DISTINGUISHABLE = "distinguishable from zero"
INDISTINGUISHABLE = "indistinguishable from zero"
ONE_SEED = "not measured: one seed"
NO_SEED = "not measured: no seed"

RULE = ("a tax is distinguishable from zero when |mean| > t(0.975, n-1) x SE (Student's t, two-sided 95%), "
        f"SE = sd / sqrt(n) over n >= {MIN_SEEDS} seeds (t = 12.71 at n = 2, 4.30 at n = 3, 2.78 at n = 5); "
        "with one seed it is not measured")
"""The verdict rule in words (report.md, the command's output)."""


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _threshold(x: float) -> str:
    return f"{100 * x:g}%"


def sample_sd(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof = 1) of `values`; NaN with fewer than two."""
    arr = np.asarray(list(values), dtype=float)
    return float(arr.std(ddof=1)) if arr.size >= MIN_SEEDS else math.nan


def standard_error(values: Sequence[float]) -> float:
    """SE = sd / sqrt(n) of the mean of `values` (sd with ddof = 1); NaN with fewer than two."""
    n = len(values)
    return sample_sd(values) / math.sqrt(n) if n >= MIN_SEEDS else math.nan


def t_critical(n: int) -> float:
    """t_crit = t(1 - (1 - CONFIDENCE) / 2, n - 1), the 97.5% quantile of Student's t with
    n - 1 degrees of freedom (Student 1908): the multiplier of SE in the verdict. NaN for
    n < 2 (no degrees of freedom)."""
    if n < MIN_SEEDS:
        return math.nan
    from scipy.stats import t  # lazy: scipy.stats takes seconds to import; only the verdict needs it

    return float(t.ppf(1.0 - (1.0 - CONFIDENCE) / 2.0, n - 1))


def tax_verdict(mean: float, se: float, n: int) -> str:
    """Whether a mean tax over n paired seeds is distinguishable from zero:
    DISTINGUISHABLE when n >= 2 and |mean| > t(0.975, n - 1) SE (`t_critical`), else
    INDISTINGUISHABLE; ONE_SEED / NO_SEED when n < 2 (no spread to compare with)."""
    if n < 1:
        return NO_SEED
    if n < MIN_SEEDS:
        return ONE_SEED
    return DISTINGUISHABLE if abs(mean) > t_critical(n) * se else INDISTINGUISHABLE


def tax_noise(per_seed: Mapping) -> dict:
    """The noise floor of one size's tax from its per-seed values {seed: tax(s, r)}:
    {"se": SE (NaN for n < 2), "t_crit": `t_critical` (NaN for n < 2), "verdict": `tax_verdict`,
    "distinguishable": bool (None for n < 2)}."""
    values = [float(v) for v in per_seed.values()]
    n = len(values)
    mean = float(np.mean(values)) if values else math.nan
    se = standard_error(values)
    verdict = tax_verdict(mean, se, n)
    return {"se": se, "t_crit": t_critical(n), "verdict": verdict,
            "distinguishable": None if n < MIN_SEEDS else verdict == DISTINGUISHABLE}


def seed_spread(losses: Mapping) -> dict:
    """The spread over seeds of a size's baseline losses {seed: L_base(s, r)}:
    {"sd": sample sd (ddof = 1; NaN for n < 2), "mean", "n", "rel": sd / mean (NaN for n < 2)}."""
    values = [float(v) for v in losses.values()]
    n = len(values)
    mean = float(np.mean(values)) if values else math.nan
    sd = sample_sd(values)
    rel = sd / mean if n >= MIN_SEEDS and mean != 0 else math.nan
    return {"sd": sd, "mean": mean, "n": n, "rel": rel}


def tail_drop(history: Sequence[tuple[int, float]], final_step: int | None = None,
              window: float = CONVERGENCE_WINDOW) -> tuple[float | None, str | None]:
    """The relative fall of eval/loss over the last `window` of training:
    (drop, None) with drop = (L_ref - L_end) / L_ref, or (None, why it cannot be judged).

    history: (step, eval loss) points, any order (non-finite losses are left out);
    final_step: the last training step T (default: the last eval step). L_end is the loss
    at the last eval step, L_ref at the last eval step at or before (1 - window) T.
    """
    points = sorted((int(s), float(v)) for s, v in history if v is not None and math.isfinite(v))
    if len(points) < MIN_SEEDS:
        return None, "fewer than 2 eval points"
    end_step, end = points[-1]
    total = end_step if final_step is None else max(int(final_step), end_step)
    # Integer arithmetic would need a rational window; a relative tolerance keeps
    # step 800 of 1000 inside the cut despite 0.8 * 1000 rounding.
    cut = (1.0 - window) * total * (1.0 + 1e-12)
    before = [p for p in points if p[0] <= cut]
    if not before:
        return None, f"no eval point at or before {_threshold(1 - window)} of the final step"
    ref_step, ref = before[-1]
    if ref_step == end_step:
        return None, f"no eval point in the last {_threshold(window)} of steps"
    if ref <= 0:
        return None, f"eval/loss {ref:.4g} at step {ref_step} is not positive"
    return (ref - end) / ref, None


def convergence_warnings(size: str, histories: Sequence[tuple[object, Sequence[tuple[int, float]], int | None]],
                         losses: Mapping) -> list[str]:
    """Warnings (one line each) that a size's baselines look unconverged.

    size: the size's label; histories: (seed, eval/loss history, final step) per baseline
    trial; losses: {seed: L_base(s, r)}. Lines:

    - "size S: baselines unconverged: eval/loss fell X% over the last 20% of steps
      (seed R; threshold 2%)", the baselines whose `tail_drop` exceeds CONVERGENCE_DROP,
      largest first;
    - "size S: cannot judge convergence: <why> (seed R)", once per size, for the baselines
      `tail_drop` cannot judge;
    - "size S: baselines unconverged: seed spread of eval/loss is X% of its mean (sd, mean,
      n seeds; threshold 2%)" when `seed_spread`'s rel exceeds SEED_SPREAD.
    """
    out = []
    falls, unknown = [], {}
    for seed, history, final_step in histories:
        drop, why = tail_drop(history, final_step)
        if drop is None:
            unknown.setdefault(why, []).append(seed)
        elif drop > CONVERGENCE_DROP:
            falls.append((drop, seed))
    if falls:
        falls.sort(key=lambda f: -f[0])
        label = "seed" if len(falls) == 1 else "seeds"
        out.append(f"size {size}: baselines unconverged: eval/loss fell {', '.join(_pct(d) for d, _ in falls)} "
                   f"over the last {_threshold(CONVERGENCE_WINDOW)} of steps "
                   f"({label} {', '.join(str(s) for _, s in falls)}; threshold {_threshold(CONVERGENCE_DROP)})")
    if unknown:
        parts = [f"{why} ({'seed' if len(seeds) == 1 else 'seeds'} {', '.join(str(s) for s in seeds)})"
                 for why, seeds in unknown.items()]
        out.append(f"size {size}: cannot judge convergence: {'; '.join(parts)}")
    spread = seed_spread(losses)
    if spread["n"] >= MIN_SEEDS and spread["rel"] > SEED_SPREAD:
        out.append(f"size {size}: baselines unconverged: seed spread of eval/loss is {_pct(spread['rel'])} of its "
                   f"mean (sd {spread['sd']:.4g}, mean {spread['mean']:.4g}, {spread['n']} seeds; "
                   f"threshold {_threshold(SEED_SPREAD)})")
    return out
