"""The per-call token sample of regularizers that bound their cost with `max_tokens`."""

from __future__ import annotations

import torch

from tti_dist.utils.seeding import linear_seed


class TokenSample:
    """Mixin for a Regularizer whose settings (`self.params`) have `max_tokens` (None: all tokens) and `seed`."""

    def token_index(self, num_tokens: int, call: int, device: torch.device) -> torch.Tensor | None:
        """Indices of this DP rank's tokens used by call number `call` (None: all of them).

        A uniform sample of max_tokens of the num_tokens local tokens, without replacement:
        the first max_tokens entries of a random permutation from a private torch.Generator
        seeded with linear_seed(seed, dp_rank, call). Every TP rank of a DP group draws the
        same tokens; DP ranks and calls draw different ones; the global RNG is untouched.
        """
        m = self.params.max_tokens
        if m is None or num_tokens <= m:
            return None
        gen = torch.Generator().manual_seed(linear_seed(self.params.seed, self.groups.dp_rank, call))
        return torch.randperm(num_tokens, generator=gen)[:m].to(device)
