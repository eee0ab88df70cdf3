"""The n = 2, m = 1 phase diagram of superposition: classifying a trained W, its exact expected
loss, and the closed-form losses of the three competing configurations.

Source: Elhage et al. 2022, "Toy Models of Superposition", transformer-circuits.pub/2022/toy_model,
section "Superposition as a Phase Change". Two features x_1, x_2 (each zero with probability
S, else Uniform[0, 1), independently) pass through one hidden dimension,

    h = W x = w_1 x_1 + w_2 x_2,    x'_i = ReLU(w_i h + b_i),    W = [w_1, w_2] (1 x 2), b = [b_1, b_2],

trained on L = (1/2) E[(x_1 - x'_1)^2 + r (x_2 - x'_2)^2]: feature 1 has importance 1 and the
"extra" feature 2 relative importance r. The paper colours each (r, density 1 - S) cell by what
the model does with feature 2; `classify_phase` makes that precise (PHASES).

Everything here is for n = 2, m = 1 and takes W as [1, 2] or [I, 1, 2] (or [2] / [I, 2]).
"""

from __future__ import annotations

import math

import torch

NOT_REPRESENTED, DEDICATED, SUPERPOSITION, OTHER = 0, 1, 2, 3
PHASES: tuple[str, ...] = ("not represented", "dedicated dimension", "superposition", "other")
"""Phase labels by code. With t = `threshold` (default 0.5) and the column norms |w_1|, |w_2|:

- 0 not represented: |w_2| <= t. Feature 2 is dropped; its output is the constant ReLU(b_2)
  (the optimum is b_2 = E[x_2] = (1 - S)/2). Feature 1 then normally has the dimension.
- 1 dedicated dimension: |w_2| > t and |w_1| <= t. Feature 2 has the dimension to itself and
  feature 1 is dropped (with m = 1 there is no other dimension to dedicate).
- 2 superposition: |w_1| > t, |w_2| > t and w_1 w_2 < 0. Both features share the dimension as an
  antipodal pair; the ReLU (with b <= 0) filters the negative interference of the other feature.
- 3 other: |w_1| > t, |w_2| > t and w_1 w_2 >= 0. Both stored in the same direction, so each
  feature's output rises with the other feature: a state the paper does not report (counted so
  that nothing is forced into the three phases).

The bias does not enter: with one hidden dimension W alone decides which features are stored
and whether they share it (b only shifts the outputs). The kept (lowest-loss) restarts have
norms near 0 or between about 0.75 and 1.05, so the phase rarely depends on t; the sensitivity
is measured in docs/experiments/tms_phase.md.
"""

DEFAULT_GRID = 128
"""Midpoints per axis of the quadrature in `expected_loss` (128^2 points for both features on)."""


def _w_b(W: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(w [I, 2], b [I, 2], single) from W [1, 2] / [I, 1, 2] / [2] / [I, 2] and b [2] / [I, 2]."""
    single = W.dim() == 1 or (W.dim() == 2 and W.shape[0] == 1 and b.dim() == 1)
    w = W.reshape(-1, 2)
    bb = b.reshape(-1, 2)
    if w.shape[0] != bb.shape[0] or W.shape[-1] != 2 or (W.dim() == 3 and W.shape[1] != 1):
        raise ValueError(f"need W [1, 2] or [I, 1, 2] and b [2] or [I, 2] (n = 2, m = 1), got "
                         f"{list(W.shape)} and {list(b.shape)}")
    return w, bb, single


def classify_phase(W: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Phase code (PHASES) of each n = 2, m = 1 model: int64, [] for one model or [I].

    Codes: 0 not represented (|w_2| <= t), 1 dedicated dimension (|w_2| > t >= |w_1|),
    2 superposition (both > t, w_1 w_2 < 0), 3 other (both > t, w_1 w_2 >= 0). `b` is checked for
    shape only (see PHASES for why the bias does not enter).
    """
    w, _, single = _w_b(W, b)
    rep1, rep2 = w[:, 0].abs() > threshold, w[:, 1].abs() > threshold
    antipodal = w[:, 0] * w[:, 1] < 0
    code = torch.full((w.shape[0],), OTHER, dtype=torch.int64, device=w.device)
    code[rep1 & rep2 & antipodal] = SUPERPOSITION
    code[rep2 & ~rep1] = DEDICATED
    code[~rep2] = NOT_REPRESENTED
    return code[0] if single else code


def expected_loss(W: torch.Tensor, b: torch.Tensor, importance: torch.Tensor, density: torch.Tensor | float,
                  grid: int = DEFAULT_GRID, chunk: int = 64) -> torch.Tensor:
    """Expected loss (1/2) sum_i I_i E[(x_i - x'_i)^2] of n = 2, m = 1 models, in float64: [] or [I].

    x_i = a_i u_i with a_i ~ Bernoulli(p), u_i ~ Uniform[0, 1) (p = density = 1 - S), so

        E = (1-p)^2 e(0, 0) + p (1-p) (E_u e(u, 0) + E_u e(0, u)) + p^2 E_{u,v} e(u, v),

    with e(x) = sum_i I_i (x_i - x'_i)^2, the 1-D and 2-D expectations by the midpoint rule on
    `grid` (and grid^2) points. The error is O(1/grid^2) (the integrands are piecewise smooth,
    with kinks only where a ReLU switches): at grid 128 the relative error of the closed forms in
    `configuration_losses` is below 1e-4. Unlike the loss on a sampled batch this has no noise,
    so restarts whose losses differ by far less than the sampling error are still ranked right.

    importance: [2] or [I, 2]; density: a number or [I].
    """
    w, bb, single = _w_b(W, b)
    w, bb = w.double(), bb.double()
    num = w.shape[0]
    imp = importance.double().to(w.device).expand(num, 2)
    p = torch.as_tensor(density, dtype=torch.float64, device=w.device).expand(num)
    u = (torch.arange(grid, dtype=torch.float64, device=w.device) + 0.5) / grid
    zero = torch.zeros_like(u)
    points = {  # the values (x_1, x_2) of each activity pattern: [P, 2]
        "one": torch.stack([u, zero], dim=-1),
        "two": torch.stack([zero, u], dim=-1),
        "both": torch.cartesian_prod(u, u),
    }
    out = []
    for start in range(0, num, chunk):
        s = slice(start, start + chunk)

        def mean_error(x: torch.Tensor) -> torch.Tensor:  # x [P, 2] -> E_x e(x) per instance [i]
            h = x @ w[s].T  # [P, i]
            recon = torch.relu(h.T.unsqueeze(-1) * w[s].unsqueeze(1) + bb[s].unsqueeze(1))  # [i, P, 2]
            return ((x.unsqueeze(0) - recon) ** 2 * imp[s].unsqueeze(1)).sum(-1).mean(-1)

        q = p[s]
        none = (torch.relu(bb[s]) ** 2 * imp[s]).sum(-1)
        total = ((1 - q) ** 2 * none + q * (1 - q) * (mean_error(points["one"]) + mean_error(points["two"]))
                 + q * q * mean_error(points["both"]))
        out.append(total / 2)
    result = torch.cat(out)
    return result[0] if single else result


def configuration_losses(density: float, ratio: float) -> dict[str, float]:
    """Closed-form expected losses (1/2) sum_i I_i E[(x_i - x'_i)^2] of the three configurations
    the phase diagram compares, with importances [1, r] and density p = 1 - S:

    - not represented, W = [1, 0], b = [0, p/2]: feature 1 exact, feature 2 the constant
      E[x_2] = p/2, loss r Var(x_2) / 2 = r (p/3 - p^2/4) / 2. (E[x^2] = p/3, E[x] = p/2.)
    - dedicated dimension, W = [0, 1], b = [p/2, 0]: the same with the features swapped,
      (p/3 - p^2/4) / 2.
    - superposition, W = [1, -1], b = 0: x'_1 = ReLU(x_1 - x_2) is exact unless both features are
      on (probability p^2), where the error is min(x_1, x_2), E[min(u, v)^2] = 1/6; so
      (1 + r) p^2 / 12.

    The first two are the best the model can do with one feature dropped (one feature exact,
    the other at its mean), so they are exact optima of their phase; the third fixes unit norms
    and b = 0, so it only bounds the superposition phase's optimum from above.
    """
    p, r = float(density), float(ratio)
    var = p / 3 - p * p / 4
    return {"not represented": r * var / 2, "dedicated dimension": var / 2, "superposition": (1 + r) * p * p / 12}


def analytic_phase(density: float, ratio: float) -> int:
    """Phase code of the configuration in `configuration_losses` with the lowest loss (a tie
    between not represented and dedicated, at r = 1, goes to not represented)."""
    losses = configuration_losses(density, ratio)
    return min((NOT_REPRESENTED, DEDICATED, SUPERPOSITION), key=lambda c: (losses[PHASES[c]], c))


def superposition_density(ratio: float) -> float:
    """The density below which superposition beats both dedicated configurations in closed form:

        p*(r) = 4 / (5 + 2 max(r, 1/r)),

    from (1 + r) p^2 / 12 < min(1, r) (p/3 - p^2/4) / 2. It is symmetric in log r, peaks at
    p*(1) = 4/7 and falls as 2/r for large r (4/25 = 0.16 at r = 10 or 1/10). Above it the more
    important feature takes the dimension (r < 1: feature 1, so feature 2 is not represented;
    r > 1: feature 2 gets a dedicated dimension).
    """
    rho = max(float(ratio), 1.0 / float(ratio))
    return 4.0 / (5.0 + 2.0 * rho)


def log_grid_edges(values: list[float]) -> list[float]:
    """Cell edges for values on a log scale: geometric midpoints, and the outer edges half a
    step out (for a heatmap of the grid on log axes)."""
    v = sorted(values)
    if len(v) == 1:
        return [v[0] / math.sqrt(10), v[0] * math.sqrt(10)]
    logs = [math.log(x) for x in v]
    mids = [(a + c) / 2 for a, c in zip(logs, logs[1:])]
    edges = [logs[0] - (mids[0] - logs[0])] + mids + [logs[-1] + (logs[-1] - mids[-1])]
    return [math.exp(e) for e in edges]
