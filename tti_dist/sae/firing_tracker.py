"""Which SAE latents fire: dead-latent tracking and firing density over the global batch (all DP ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class FiringTracker:
    """Tokens since each local latent last fired, counted in GLOBAL tokens (all DP ranks).

    Definition: a latent fires on a token when f != 0. After each `update` (one micro-batch
    per DP rank), with T = the tokens of that micro-batch summed over the DP group and
    fired_i = "latent i fired on some token of some DP rank":
        tokens_since_fired_i <- 0                          if fired_i
        tokens_since_fired_i <- tokens_since_fired_i + T   otherwise
    and `dead_mask()` = tokens_since_fired >= dead_window_tokens: a latent is alive while it
    fired on ANY DP rank within the last window of global tokens (granularity: one update;
    a latent that fired counts as having fired at the update's last token). New latents
    start at 0, i.e. alive for the first window (as in Gao et al.).

    The counts are identical on every DP rank of a TP rank's latents (one all-reduce SUM over
    dp_group of n/tp + 1 int64 per update: the per-latent firing-token counts and the token
    count, 8 (n/tp + 1) bytes), and each TP rank tracks its own n/tp latents (no TP
    communication). The per-latent firing-token counts also accumulate into `density()`,
    the share of global tokens on which each latent fired since the last `reset_density()`.
    State (checkpointed via state_dict) is local: a shard along dim 0 of the global [n] vectors.
    """

    def __init__(
        self,
        num_local_latents: int,
        dead_window_tokens: int,
        dp_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if dead_window_tokens < 1:
            raise ValueError(f"FiringTracker: dead_window_tokens {dead_window_tokens!r} must be >= 1")
        self.dead_window_tokens = int(dead_window_tokens)
        self.dp_group = dp_group
        self.tokens_since_fired = torch.zeros(num_local_latents, dtype=torch.int64, device=device)
        self.fire_counts = torch.zeros(num_local_latents, dtype=torch.int64, device=device)
        self.num_tokens = torch.zeros((), dtype=torch.int64, device=device)
        # Host-side count of global tokens seen (local tokens x dp_size per update, i.e. equal
        # micro-batches on every DP rank, as the trainer guarantees): until it reaches the
        # window no latent can be dead, which callers can know without a device sync.
        self.tokens_seen = 0
        self._dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1

    def may_have_dead(self) -> bool:
        """False while fewer than dead_window_tokens global tokens were seen (no latent can be
        dead yet); a host-side check, no device sync."""
        return self.tokens_seen >= self.dead_window_tokens

    @torch.no_grad()
    def update(self, latents: torch.Tensor) -> None:
        """Record one micro-batch: latents [..., n/tp] (this DP rank's tokens)."""
        n_l = self.tokens_since_fired.numel()
        f = latents.detach().reshape(-1, n_l)
        packed = torch.cat([(f != 0).sum(dim=0).to(torch.int64),
                            torch.tensor([f.shape[0]], dtype=torch.int64, device=f.device)])
        packed = packed.to(self.tokens_since_fired.device)
        if self.dp_group is not None:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.dp_group)
        counts, tokens = packed[:-1], packed[-1]
        self.tokens_seen += f.shape[0] * self._dp_size
        self.tokens_since_fired.add_(tokens).masked_fill_(counts > 0, 0)
        self.fire_counts.add_(counts)
        self.num_tokens.add_(tokens)

    def dead_mask(self) -> torch.Tensor:
        """Local bool [n/tp]: True where the latent has not fired in the last dead_window_tokens global tokens."""
        return self.tokens_since_fired >= self.dead_window_tokens

    def density(self) -> torch.Tensor:
        """Local float [n/tp]: share of global tokens since reset_density() on which each latent fired."""
        return self.fire_counts.double() / self.num_tokens.clamp_min(1).double()

    def reset_density(self) -> None:
        """Start a new density window (e.g. at each log step); dead tracking is unaffected."""
        self.fire_counts.zero_()
        self.num_tokens.zero_()

    def state_dict(self) -> dict:
        """Local counters (copies)."""
        return {"tokens_since_fired": self.tokens_since_fired.clone(), "fire_counts": self.fire_counts.clone(),
                "num_tokens": self.num_tokens.clone(), "dead_window_tokens": self.dead_window_tokens,
                "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        """Restore counters saved by `state_dict` (same local latent count)."""
        if state["tokens_since_fired"].shape != self.tokens_since_fired.shape:
            raise ValueError(f"FiringTracker: state for {state['tokens_since_fired'].numel()} latents, "
                             f"this tracker has {self.tokens_since_fired.numel()}")
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.fire_counts.copy_(state["fire_counts"])
        self.num_tokens.copy_(state["num_tokens"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
