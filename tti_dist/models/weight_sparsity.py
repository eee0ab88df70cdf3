"""Which weight matrices are sparsified, and the exact distributed AbsTopK mask over a matrix's TP shards.

Weight sparsity (Gao et al. 2025, "Weight-sparse transformers have interpretable circuits";
openai/circuit_sparsity). After every optimizer step each selected matrix W keeps its k
largest-magnitude entries and the rest are set to 0:

    mask = AbsTopK_k(W)   (the k entries of largest |W_ij|),   W <- W * mask,
    k = floor(density_t * numel(W)),

with a minimum of j = min_per_neuron entries per neuron (the neuron's own j largest |w| are
kept first; the remaining k - j * neurons go to the largest |w| among the rest, as the
reference code does by giving the forced entries an infinite score).

Order and ties. Entries are ranked by (|w| desc, neuron-major index asc): the neuron-major
index of a column-parallel matrix [out, in] (attn.qkv, mlp.fc1; neurons = output rows) is
row * in + col, that of a row-parallel one (attn.proj, mlp.fc2; neurons = input columns, the
MLP units / attention channels) is col * out + row. Under tensor parallelism each rank holds
a contiguous range of neurons (whole rows, or whole columns), so each rank's entries form a
contiguous range of that index, and the mask is exactly the TP=1 mask of the whole matrix,
ties included.

Distributed selection (`abs_topk_masks`), all matrices of the step together:
  1. keys: the float32 bit patterns of |w| as int32 (monotone in |w| for non-negative
     floats); forced entries get 0x7F800001, above the pattern of every |w| up to +inf.
  2. the k-th largest key over all TP ranks by a most-significant-digit-first radix select
     over the 31 key bits in 3 passes (11, 11 and 9 bits): each pass histograms the digit
     of the keys that still match the digits chosen so far (torch.bincount), sums the
     histograms over TP (one all-reduce of [matrices, 2048] int64), picks the digit whose
     count from the top reaches k, and keeps only the keys with that digit as candidates
     (a compaction, so passes 2 and 3 touch a small fraction of the weights; on a GPU each
     compaction is one host synchronisation).
  3. ties at the k-th key go to lower ranks first (one all-gather of the tie counts,
     [matrices] int64 per rank), and within a rank to the lower neuron-major index (a cumsum).
Communication per call: 3 all-reduces of 16 KiB per matrix and one all-gather of 8 bytes per
matrix per rank, over the TP group; nothing at TP=1. Compute: a few elementwise passes over
the weights and one bincount, plus, with min_per_neuron, one torch.topk of j per neuron.

Why not a gather of the candidates (models.sparsity.topk_mask's method): k is a large
fraction of the matrix (a quarter, say), so gathering the candidate values would move about
the whole matrix over TP at every step; the radix select moves a few KiB.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tti_dist.config.schema import ModelConfig
from tti_dist.distributed.collectives import all_gather_single
from tti_dist.config.weight_sparsity import WeightSparsityConfig
from tti_dist.errors import ConfigError
from tti_dist.models.layout import model_layout
from tti_dist.models.sparsity import topk_mask

SPARSIFIABLE_ROLES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
"""Roles (tti_dist.models.layout.Linear.role) whose weight can be sparsified."""

_FORCED_KEY = 0x7F800001
"""Key of an entry kept by min_per_neuron: above the bit pattern of every float32 |w| up to +inf."""


@dataclass(frozen=True)
class SparseMatrix:
    """One weight matrix under weight sparsity."""

    name: str
    """Module path, e.g. blocks.0.mlp.fc1 (its parameter is `<name>.weight`)."""
    parallel: str
    """'column' (output rows split over TP; neurons are rows) or 'row' (input columns split; neurons are columns)."""
    shape: tuple[int, int]
    """Global [out, in]."""

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def neurons(self) -> int:
        """Global neuron count: rows of a column-parallel matrix, columns of a row-parallel one."""
        return self.shape[0] if self.parallel == "column" else self.shape[1]

    def kept(self, density: float, min_per_neuron: int = 0) -> int:
        """Entries kept at `density`: floor(density * numel), at least min_per_neuron * neurons."""
        return max(math.floor(density * self.numel + 1e-9), min_per_neuron * self.neurons, 1)


def selected_matrices(model_cfg: ModelConfig, ws: WeightSparsityConfig,
                      where: str = "weight_sparsity") -> list[SparseMatrix]:
    """The matrices `ws.matrices` selects, in module order; ConfigError (one line) when a glob
    selects nothing or a matrix that cannot be sparsified, or when min_per_neuron does not fit."""
    linears = model_layout(model_cfg).linears
    chosen: list[SparseMatrix] = []
    allowed = [lin.name for lin in linears if lin.role in SPARSIFIABLE_ROLES]
    for j, pattern in enumerate(ws.matrices):
        hits = [lin for lin in linears if fnmatch.fnmatchcase(lin.name, pattern)]
        bad = [lin.name for lin in hits if lin.role not in SPARSIFIABLE_ROLES]
        if bad:
            raise ConfigError(f"{where}.matrices[{j}]: {pattern!r} selects {bad[0]}, which cannot be sparsified; "
                              f"allowed: the dense blocks' {', '.join(SPARSIFIABLE_ROLES)} (e.g. blocks.*.mlp.fc1)")
        if not hits:
            example = allowed[0] if allowed else "none in this model"
            raise ConfigError(f"{where}.matrices[{j}]: {pattern!r} selects no linear layer; allowed: the dense "
                              f"blocks' {', '.join(SPARSIFIABLE_ROLES)} (e.g. {example})")
    for lin in linears:
        if lin.role in SPARSIFIABLE_ROLES and any(fnmatch.fnmatchcase(lin.name, p) for p in ws.matrices):
            chosen.append(SparseMatrix(lin.name, lin.parallel, lin.weight_shape))
    for m in chosen:
        need = ws.min_per_neuron * m.neurons
        if need > math.floor(ws.density * m.numel + 1e-9):
            raise ConfigError(f"{where}.min_per_neuron: {ws.min_per_neuron} x {m.neurons} neurons of {m.name} = "
                              f"{need} weights is more than density {ws.density} keeps "
                              f"({math.floor(ws.density * m.numel + 1e-9)} of {m.numel}); lower it or raise density")
    return chosen


def neuron_major(w: torch.Tensor, parallel: str) -> torch.Tensor:
    """[neurons, fan] view of a local weight shard: itself (column-parallel) or its transpose (row-parallel)."""
    return w if parallel == "column" else w.t()


def _keys(w: torch.Tensor, parallel: str, min_per_neuron: int) -> torch.Tensor:
    """int32 keys of |w| in w's own layout (flat), forced entries at _FORCED_KEY."""
    keys = w.detach().float().abs().contiguous().view(torch.int32)
    if min_per_neuron > 0:
        nm = neuron_major(w.detach(), parallel)
        forced = topk_mask(nm, min(min_per_neuron, nm.shape[1]), by="abs")  # per neuron, ties to the lower index
        keys = keys.masked_fill(neuron_major(forced, parallel), _FORCED_KEY)
    return keys.reshape(-1)


def _histograms(candidates: list[torch.Tensor], shift: int, bits: int, tp_group, tp_size: int) -> torch.Tensor:
    """[M, 2^bits] counts of digit (key >> shift) & (2^bits - 1) of each matrix's candidate
    keys, summed over the TP group (one all-reduce)."""
    size = 1 << bits
    hist = torch.stack([torch.bincount((c >> shift) & (size - 1), minlength=size) for c in candidates])
    if tp_size > 1:
        dist.all_reduce(hist, op=dist.ReduceOp.SUM, group=tp_group)
    return hist


def _choose_digit(hist: torch.Tensor, remaining: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per matrix: the digit holding the remaining-th largest candidate, and the remaining
    count within it (remaining minus the candidates with a larger digit)."""
    from_top = hist.flip(-1).cumsum(-1)  # entry i: candidates whose digit >= size - 1 - i
    pos = (from_top < remaining.unsqueeze(-1)).sum(-1).clamp(max=hist.shape[-1] - 1)
    above = torch.where(pos > 0, from_top.gather(-1, (pos - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1),
                        torch.zeros_like(pos))
    return hist.shape[-1] - 1 - pos, remaining - above


@torch.no_grad()
def abs_topk_masks(
    weights: list[torch.Tensor],
    parallels: list[str],
    ks: list[int],
    *,
    min_per_neuron: int = 0,
    tp_group: dist.ProcessGroup | None = None,
    tp_size: int = 1,
    tp_rank: int = 0,
) -> list[torch.Tensor]:
    """Bool masks (each of its weight's local shape) keeping the global top-k |w| of each matrix.

    weights[m] is this TP rank's shard of matrix m (whole neurons: rows for 'column', columns
    for 'row'; every rank's shard of a matrix has the same size), ks[m] the entries to keep
    over the whole matrix, 1..its size. Exactly the TP=1 selection,
    ties included (module docstring for the order and the algorithm).
    """
    if not weights:
        return []
    device = weights[0].device
    keys = [_keys(w, par, min_per_neuron) for w, par in zip(weights, parallels)]
    for k, key in zip(ks, keys):
        if not 1 <= k <= key.numel() * tp_size:
            raise ValueError(f"abs_topk_masks: k={k} must be in 1..{key.numel() * tp_size} (the matrix's size)")
    remaining = torch.tensor(ks, dtype=torch.int64, device=device)
    # Radix select over the 31 key bits, most significant first: 11 + 11 + 9 bits. After each
    # pass only the keys sharing the chosen leading digits stay candidates (compacted), so the
    # later passes touch a small fraction of the weights.
    prefix = torch.zeros(len(keys), dtype=torch.int64, device=device)
    candidates = keys
    for shift, bits in ((20, 11), (9, 11), (0, 9)):
        hist = _histograms(candidates, shift, bits, tp_group, tp_size)
        digit, remaining = _choose_digit(hist, remaining)
        prefix = (prefix << bits) | digit
        if shift:
            candidates = [c[((c >> shift) & ((1 << bits) - 1)) == digit[m]] for m, c in enumerate(candidates)]
    # prefix[m] is the k-th largest key; `remaining` of the keys equal to it are kept, lower
    # ranks first, then lower neuron-major index.
    eq_local = torch.stack([(c == prefix[m]).sum() for m, c in enumerate(candidates)])
    if tp_size > 1:
        eq_all = torch.empty(tp_size, len(keys), dtype=torch.int64, device=device)
        all_gather_single(eq_all.view(-1), eq_local, group=tp_group)
        eq_before = eq_all[:tp_rank].sum(dim=0)
    else:
        eq_before = torch.zeros_like(eq_local)
    take = (remaining - eq_before).clamp(min=0).minimum(eq_local)
    masks = []
    for m, (key, w, par) in enumerate(zip(keys, weights, parallels)):
        threshold = prefix[m].to(torch.int32)
        keep = (key > threshold).view(w.shape)
        eq = neuron_major((key == threshold).view(w.shape), par)
        first = eq & (eq.reshape(-1).cumsum(0).view(eq.shape) <= take[m])
        masks.append(keep | neuron_major(first, par))
    return masks
