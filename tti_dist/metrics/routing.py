"""Routing metrics of mixture-of-experts layers: pure functions on tensors.

Definitions in docs/metrics.md#routing-metrics: routing entropy, expert shares, and expert
specialization as the normalized mutual information between expert id and a ground-truth
factor. Conventions:

- Labels are int64; a negative label means "not counted" (a factor inactive at that token,
  or a route dropped by the capacity limit): the position is left out of every count.
- Counts are float64 (exact for integers below 2^53), so sums over ranks are exact and a
  sharded computation equals the unsharded one bit for bit.
- Information quantities are in nats (natural logarithm), with 0 log 0 = 0.
- Functions that communicate take their process group explicitly (`group=`; None means no
  communication, never the world group).

`tti_dist.metrics.routing_probe.RoutingProbe` assembles these over the DP group on a fixed
probe set (moe/blocks.{i}/nmi_<factor>, nmi_token, stability, probe_dropped_frac).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def entropy_nats(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of each row (last dim) of a probability tensor, in nats:

        H(p) = -sum_e p_e log p_e,   with 0 log 0 = 0.

    Uniform over E entries gives log E, one-hot gives 0 (Shannon 1948). Computed in the
    input's dtype (at least fp32); the rows are not renormalized.
    """
    p = probs if probs.dtype in (torch.float32, torch.float64) else probs.float()
    return -torch.special.xlogy(p, p).sum(dim=-1)


def _check_labels(x: torch.Tensor, num: int, what: str) -> None:
    if x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"{what}: labels must be an integer tensor, got {x.dtype}")
    if num < 0:
        raise ValueError(f"{what}: number of classes must be >= 0, got {num}")


def contingency_counts(a: torch.Tensor, b: torch.Tensor, num_a: int, num_b: int, group=None) -> torch.Tensor:
    """Joint counts of two labelings: float64 [num_a, num_b] with

        C[i, j] = #{n : a_n = i and b_n = j},   positions with a_n < 0 or b_n < 0 left out.

    `a` and `b` are integer tensors of the same shape (flattened; e.g. expert id and factor
    value per token). A label >= num_a (resp. num_b) is a ValueError (one host sync to check).
    With `group`, the table is all-reduced (SUM) over that process group, so every rank of it
    holds the table of the union of the ranks' positions; None: no communication.
    """
    if a.shape != b.shape:
        raise ValueError(f"contingency_counts: labelings differ in shape, {tuple(a.shape)} vs {tuple(b.shape)}")
    _check_labels(a, num_a, "contingency_counts(a)")
    _check_labels(b, num_b, "contingency_counts(b)")
    a, b = a.reshape(-1).long(), b.reshape(-1).long()
    if a.numel():
        max_a, max_b = torch.stack([a.max(), b.max()]).tolist()
        if max_a >= num_a:
            raise ValueError(f"contingency_counts: label {max_a} of a is out of range for num_a={num_a}")
        if max_b >= num_b:
            raise ValueError(f"contingency_counts: label {max_b} of b is out of range for num_b={num_b}")
    counts = _joint_counts(a, b, num_a, num_b)
    if group is not None:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return counts


def _joint_counts(a: torch.Tensor, b: torch.Tensor, num_a: int, num_b: int) -> torch.Tensor:
    """Local float64 [num_a, num_b] table of flat int64 labels already known to be < num_*
    (no checks, no host sync)."""
    keep = (a >= 0) & (b >= 0)
    # Negative positions go to one extra bin past the table, dropped after counting
    # (boolean indexing would need a host sync for the output size).
    flat = torch.where(keep, a * num_b + b, torch.full_like(a, num_a * num_b))
    counts = torch.bincount(flat, minlength=num_a * num_b + 1)[: num_a * num_b]
    return counts.to(torch.float64).reshape(num_a, num_b)


def _information_terms(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """0-d float64 tensors (no host sync) from a contingency table C (n = sum C,
    r = row sums, s = column sums):

        I(A;B) = sum_{ij: C_ij > 0} (C_ij / n) log(C_ij n / (r_i s_j))
        H(A)   = -sum_i (r_i / n) log(r_i / n),   H(B) likewise with s,

    plus n and the numbers of occupied rows/columns. For a product table C_ij = r_i s_j / n
    every ratio C_ij n / (r_i s_j) is exactly 1 in float64 (integer products below 2^53),
    so I is exactly 0. I is clamped at 0 against rounding (it is >= 0 by Gibbs' inequality).
    """
    c = counts.to(torch.float64)
    n = c.sum()
    r, s = c.sum(1), c.sum(0)
    outer = r[:, None] * s[None, :]
    ratio = torch.where(c > 0, c * n / torch.where(outer > 0, outer, 1.0), 1.0)
    safe_n = torch.where(n > 0, n, 1.0)
    mi = (torch.special.xlogy(c, ratio).sum() / safe_n).clamp_min(0.0)
    pr, ps = r / safe_n, s / safe_n
    h_a = -torch.special.xlogy(pr, pr).sum()
    h_b = -torch.special.xlogy(ps, ps).sum()
    return {"mi": mi, "h_a": h_a.clamp_min(0.0), "h_b": h_b.clamp_min(0.0), "n": n,
            "rows": (r > 0).sum(), "cols": (s > 0).sum()}


def _nmi_tensor(counts: torch.Tensor) -> torch.Tensor:
    """`normalized_mutual_information` as a 0-d float64 tensor (no host sync)."""
    t = _information_terms(counts)
    mean_h = (t["h_a"] + t["h_b"]) / 2
    eps = torch.finfo(torch.float64).eps
    nmi = (t["mi"] / mean_h.clamp_min(eps)).clamp(0.0, 1.0)
    nmi = torch.where((t["rows"] == 1) & (t["cols"] == 1), torch.ones_like(nmi), nmi)
    return torch.where(t["n"] > 0, nmi, torch.full_like(nmi, math.nan))


def mutual_information(counts: torch.Tensor) -> float:
    """Mutual information I(A;B) in nats of the empirical joint distribution of a
    contingency table C [num_a, num_b] (n = sum C, r/s = row/column sums):

        I(A;B) = sum_{ij: C_ij > 0} (C_ij / n) log(C_ij n / (r_i s_j)).

    0 for an empty table. (Cover & Thomas, Elements of Information Theory, eq. 2.28.)
    """
    return float(_information_terms(counts)["mi"].item())


def normalized_mutual_information(counts: torch.Tensor) -> float:
    """Normalized mutual information with arithmetic normalization, from a contingency table:

        NMI = I(A;B) / ((H(A) + H(B)) / 2)        in [0, 1]

    (Strehl & Ghosh 2002; Vinh, Epps & Bailey 2010, "NMI_sum"); the default of
    scikit-learn's `normalized_mutual_info_score` (average_method="arithmetic"), whose
    conventions it follows: 1.0 when both labelings have a single occupied class
    (H(A) = H(B) = 0); 0 when only one of them does (then I = 0). Unlike scikit-learn, an
    empty table (no counted pairs) gives nan (scikit-learn returns 1.0 for empty labelings).
    The result is clipped to [0, 1] against rounding. 1 means each class of A determines the
    class of B and vice versa (a relabeling); 0 means independence.
    """
    return float(_nmi_tensor(counts).item())


def _agreement_counts(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """float64 [2]: (#positions with both >= 0 and equal, #positions with both >= 0); no sync."""
    both = (prev >= 0) & (cur >= 0)
    return torch.stack([(both & (prev == cur)).sum(), both.sum()]).to(torch.float64)


def routing_agreement(prev: torch.Tensor, cur: torch.Tensor) -> float:
    """Share of positions, among those where both assignments are >= 0 (routed), on which
    two expert assignments of the same tokens agree:

        agreement = #{n : prev_n >= 0, cur_n >= 0, prev_n = cur_n} / #{n : prev_n >= 0, cur_n >= 0}

    nan if no position is routed in both. Routing stability across training: the
    first-choice experts of a fixed probe set at two evaluation steps (1 = unchanged).
    """
    if prev.shape != cur.shape:
        raise ValueError(f"routing_agreement: shapes differ, {tuple(prev.shape)} vs {tuple(cur.shape)}")
    equal, total = _agreement_counts(prev, cur).tolist()
    return equal / total if total > 0 else math.nan


def expert_shares(first_choice: torch.Tensor, num_experts: int, group=None) -> torch.Tensor:
    """Share of tokens whose first-choice expert is e: float64 [num_experts] with

        share_e = #{n : first_choice_n = e} / #{n : first_choice_n >= 0},

    counts all-reduced (SUM) over `group` first when given (so the shares are global), then
    normalized; negative entries (dropped routes) are left out of both counts. All nan when
    no entry is counted. A value >= num_experts is a ValueError (one host sync to check).
    """
    _check_labels(first_choice, num_experts, "expert_shares")
    flat = first_choice.reshape(-1).long()
    if flat.numel() and int(flat.max()) >= num_experts:
        raise ValueError(f"expert_shares: expert {int(flat.max())} is out of range for num_experts={num_experts}")
    counts = _joint_counts(flat, torch.zeros_like(flat), num_experts, 1).reshape(num_experts)
    if group is not None:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return counts / counts.sum()
