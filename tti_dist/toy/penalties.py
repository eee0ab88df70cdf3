"""The project's regularizers, per toy-model instance (one value per instance, never mixed).

Each function returns a tensor [I] so that the training loss, summed over instances, keeps
the instances independent. The top-k constraint is architectural and lives in the model
(`tti_dist.toy.model.ToyModel`).
"""

from __future__ import annotations

import torch


def l1_hidden(h_BIM: torch.Tensor) -> torch.Tensor:
    """L1 activation penalty on the hidden vector, per instance: (1 / (B m)) sum_b sum_k |h_bk|.

    h = W x is the bottleneck activation [batch, instances, m]. The same quantity as the
    project's `l1` regularizer (tti_dist/regularizers/l1.py): the lasso penalty (Tibshirani
    1996, "Regression Shrinkage and Selection via the Lasso") on activations, i.e. the
    sparse-coding objective (Olshausen & Field 1996). Returns [instances].
    """
    return h_BIM.abs().mean(dim=(0, 2))


def orthogonality(W_IMN: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Soft orthogonality of the feature directions, per instance, exact full Gram:

        L = (1 / (n (n - 1))) sum_{i != j} cos(W_i, W_j)^2,   cos = W_i . W_j / (|W_i| |W_j|),

    over the n columns W_i of each instance's W [m, n]: the penalty ||W_hat^T W_hat - I||_F^2
    of Bansal, Chen & Wang 2018 ("Can We Gain More from Orthogonality Regularizations in
    Training Deep CNNs?") on normalized directions, divided by the number of ordered pairs,
    as the project's `orthogonality` regularizer in mode `full`
    (tti_dist/regularizers/orthogonality.py). It penalises angles only, not norms; with
    n > m directions it cannot reach 0 (its minimum, n / m - 1 over n - 1, is a tight frame).
    Norms are clamped at `eps`, so a zero column contributes nothing. Returns [instances].
    """
    n = W_IMN.shape[-1]
    unit = W_IMN / torch.linalg.vector_norm(W_IMN, dim=1, keepdim=True).clamp(min=eps)
    gram = torch.einsum("ami,amj->aij", unit, unit)
    off = gram - torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))
    return (off * off).sum(dim=(-2, -1)) / (n * (n - 1))
