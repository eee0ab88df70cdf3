"""Rotary position embeddings (Su et al. 2021, RoFormer, arXiv:2104.09864).

q and k of shape [batch, heads, seq, head_dim] are rotated pairwise: for the pair
(x_i, x_{i + d/2}) at position p with frequency theta_i = base^(-2i/d),
    (x_i, x_{i+d/2}) -> (x_i cos(p theta_i) - x_{i+d/2} sin(p theta_i),
                         x_{i+d/2} cos(p theta_i) + x_i sin(p theta_i))
(the "rotate half" layout used by GPT-NeoX and Llama). Written here because
megatron-core's RotaryEmbedding allocates on CUDA; the tables are computed per call in
the input's device and dtype (cheap next to attention), so nothing depends on buffers.
"""

from __future__ import annotations

import torch


def rope_tables(seq_len: int, head_dim: int, base: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [seq_len, head_dim]."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k ([B, H, T, hd]) by their positions 0..T-1."""
    cos, sin = rope_tables(q.shape[-2], q.shape[-1], base, q.device, q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
