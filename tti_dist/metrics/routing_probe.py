"""Routing stability and expert specialization of the MoE layers on a fixed probe set.

At each evaluation step `RoutingProbe.measure` runs the model (eval mode, no grad) on the
same probe batches and reads each MoE layer's first-choice expert per input token from the
hookpoint `blocks.{i}.moe.expert` (`expert[..., 0]`; -1 where the eval capacity limit
dropped that route). Per MoE layer i, with tag prefix `moe/blocks.{i}/`:

    nmi_<factor>        NMI(expert; factor) over probe tokens where both are defined
                        (factor column `factor_<factor>` of the probe batches, -1 = inactive;
                        only for data with ground-truth factors, e.g. the synthetic corpus)
    nmi_token           NMI(expert; input token id)
    stability           routing_agreement(previous measure's first choices, this one's):
                        share of probe tokens routed in both measures whose first-choice
                        expert is unchanged (from the second measure on)
    probe_dropped_frac  share of probe tokens whose first-choice route was dropped

NMI is the arithmetic-normalized mutual information of the contingency table of the two
labelings (`tti_dist.metrics.routing.normalized_mutual_information`: Strehl & Ghosh 2002,
scikit-learn's default); dropped routes and inactive factor values are left out of the
table. This NMI between expert id and a ground-truth factor is the layer's expert
specialization (docs/metrics.md#routing-metrics).

Communication (all over the data-parallel group, `groups.dp_group`): every DP rank holds its
own probe batches, and all tables and counts are summed over the DP group in one float64
all-reduce per measure (exact integer sums), so the result is that of the union of the DP
ranks' probe sets and is identical on every rank. TP ranks hold identical routing, so
nothing is reduced over TP. The first measure also takes one all-reduce MAX over the DP
group for the number of values of each factor (max over the global probe set + 1).
`state_dict` all-gathers the previous assignments over the DP group (DeepSpeed saves the
client state of DP rank 0 only). Under expert parallelism every DP rank must hold the same
number of probe batches (the MoE forward is a collective over the EP group).

Capacity drops use DeepSpeed's random token selection, which draws from the global RNG:
`measure` runs under `torch.random.fork_rng`, so the training RNG stream is unchanged.
Dropped routes are random among the tokens over capacity, but stability and NMI leave them
out and the first choice of a routed token is the router's argmax, so neither depends on
that randomness; probe_dropped_frac does not either (the number of tokens over capacity is
deterministic).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from tti_dist.capture.hookpoints import ActivationCapture, list_hookpoints, resolve_hookpoints
from tti_dist.metrics.routing import _agreement_counts, _joint_counts, _nmi_tensor
from tti_dist.models.layout import is_moe_site, split_name

logger = logging.getLogger(__name__)

FACTOR_PREFIX = "factor_"
"""Probe-batch columns holding ground-truth factors: `factor_<name>`, int64, -1 = inactive."""


class RoutingProbe:
    """moe/blocks.{i}/{nmi_<factor>, nmi_token, stability, probe_dropped_frac} on fixed batches.

    Args:
        model: the (unwrapped) GPT with at least one MoE layer (hookpoint blocks.*.moe.expert).
        batches: this DP rank's probe batches, each {"tokens": int64 [B, T+1],
            "factor_<name>": int64 [B, T+1], ...} as `DistributedBatchLoader.fixed_batches_columns`
            returns them; inputs are tokens[:, :-1] and factor columns are aligned with them
            ([:, :-1]). Every batch (and every DP rank) must carry the same factor columns.
        groups: this rank's `ParallelGroups` (dp_group for the reductions, device).
        vocab_size: number of token ids (nmi_token's table is num_experts x vocab_size).
    """

    def __init__(self, model: nn.Module, batches: list[dict[str, torch.Tensor]], groups, vocab_size: int):
        if not any(is_moe_site(hp.name, "moe.expert") for hp in list_hookpoints(model)):
            raise ValueError("RoutingProbe: the model has no MoE layer (no hookpoint blocks.*.moe.expert)")
        self.hookpoints = [hp for hp in resolve_hookpoints(model, ["blocks.*.moe.expert"], "routing_probe")
                           if is_moe_site(hp.name, "moe.expert")]
        self.groups = groups
        self.vocab_size = int(vocab_size)
        if self.vocab_size <= 0:
            raise ValueError(f"RoutingProbe: vocab_size must be > 0, got {vocab_size}")
        # Per layer: hookpoint name, tag prefix, number of experts.
        self.layers: list[tuple[str, str, int]] = []
        for hp in self.hookpoints:
            index, _ = split_name(hp.name)
            moe_module = model.get_submodule(hp.name.rsplit(".", 1)[0])
            self.layers.append((hp.name, f"moe/blocks.{index}/", int(moe_module.num_experts)))

        if not batches:
            raise ValueError("RoutingProbe: no probe batches")
        columns = sorted(k for k in batches[0] if k.startswith(FACTOR_PREFIX))
        for i, batch in enumerate(batches):
            found = sorted(k for k in batch if k.startswith(FACTOR_PREFIX))
            if found != columns:
                raise ValueError(f"RoutingProbe: probe batch {i} has factor columns {found}, batch 0 has {columns}")
            for k in columns:
                if batch[k].shape != batch["tokens"].shape:
                    raise ValueError(f"RoutingProbe: probe batch {i}: {k} has shape {tuple(batch[k].shape)}, "
                                     f"tokens {tuple(batch['tokens'].shape)}")
        self.factor_names = [c[len(FACTOR_PREFIX):] for c in columns]
        device = groups.device
        # Inputs as the model sees them, and the flat per-position labels aligned with them.
        self._inputs = [b["tokens"][:, :-1].to(device=device, dtype=torch.int64) for b in batches]
        self._tokens_N = torch.cat([x.reshape(-1) for x in self._inputs])
        self._factors_N = {
            name: torch.cat([b[FACTOR_PREFIX + name][:, :-1].reshape(-1) for b in batches]).to(device, torch.int64)
            for name in self.factor_names
        }
        self.num_positions = int(self._tokens_N.numel())
        # Number of values of each factor over the global probe set (set by the first measure).
        self._num_factor_values: dict[str, int] | None = None
        # First-choice experts of the latest measure, per layer name: int64 [num_positions].
        self.previous: dict[str, torch.Tensor] | None = None

    # -- measuring ---------------------------------------------------------------------------
    def _first_choices(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """First-choice expert per input position of every probe batch, per layer (flat)."""
        pieces: dict[str, list[torch.Tensor]] = {name: [] for name, _, _ in self.layers}
        was_training = model.training
        device = self.groups.device
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        model.eval()
        try:
            with torch.random.fork_rng(devices=rng_devices), torch.no_grad(), \
                    ActivationCapture(self.hookpoints) as cap:
                for inputs in self._inputs:
                    model(inputs)
                    for name in pieces:
                        pieces[name].append(cap.captured[name][..., 0].reshape(-1).to(torch.int64))
                    cap.clear()
        finally:
            model.train(was_training)
        return {name: torch.cat(p) for name, p in pieces.items()}

    def _factor_value_counts(self) -> dict[str, int]:
        """max over the global probe set + 1 of every factor (all-reduce MAX over DP; once)."""
        device = self.groups.device
        shape = torch.tensor([len(self.factor_names), -len(self.factor_names)], dtype=torch.int64, device=device)
        dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=self.groups.dp_group)
        if shape.tolist() != [len(self.factor_names), -len(self.factor_names)]:
            raise ValueError(f"RoutingProbe: DP ranks disagree on the number of factor columns "
                             f"(this rank: {self.factor_names})")
        if not self.factor_names:
            return {}
        maxes = torch.stack([f.max() if f.numel() else torch.tensor(-1, device=device)
                             for f in self._factors_N.values()]).to(torch.int64)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=self.groups.dp_group)
        # At least one value, so a factor inactive everywhere gives an empty (nan) table.
        return {name: max(int(m) + 1, 1) for name, m in zip(self.factor_names, maxes.tolist())}

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Run the probe set and return moe/blocks.{i}/* (collective over the DP group; the same
        result on every rank). The model's train/eval mode and the RNG state are restored."""
        if self._num_factor_values is None:
            self._num_factor_values = self._factor_value_counts()
            if int(self._tokens_N.max()) >= self.vocab_size or int(self._tokens_N.min()) < 0:
                raise ValueError(f"RoutingProbe: probe token ids must lie in [0, {self.vocab_size}), got "
                                 f"[{int(self._tokens_N.min())}, {int(self._tokens_N.max())}]")
        current = self._first_choices(model)
        previous = self.previous
        # Everything summed over DP goes into one flat float64 buffer: one all-reduce.
        parts: list[torch.Tensor] = []
        layout: list[tuple[str, str, tuple[int, ...]]] = []  # (layer, what, shape)
        for name, _, num_experts in self.layers:
            experts_N = current[name]
            if int(experts_N.max()) >= num_experts:  # internal invariant of the gate
                raise AssertionError(f"{name}: expert id {int(experts_N.max())} >= {num_experts}")
            for factor in self.factor_names:
                num_values = self._num_factor_values[factor]
                parts.append(_joint_counts(experts_N, self._factors_N[factor], num_experts, num_values))
                layout.append((name, f"nmi_{factor}", (num_experts, num_values)))
            parts.append(_joint_counts(experts_N, self._tokens_N, num_experts, self.vocab_size))
            layout.append((name, "nmi_token", (num_experts, self.vocab_size)))
            dropped = torch.stack([(experts_N < 0).sum(), torch.tensor(experts_N.numel(), device=experts_N.device)])
            parts.append(dropped.to(torch.float64))
            layout.append((name, "probe_dropped_frac", (2,)))
            if previous is not None:
                parts.append(_agreement_counts(previous[name], experts_N))
                layout.append((name, "stability", (2,)))
        flat = torch.cat([p.reshape(-1) for p in parts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.groups.dp_group)
        prefixes = {name: prefix for name, prefix, _ in self.layers}
        tags, values = [], []
        offset = 0
        for name, what, shape in layout:
            size = math.prod(shape)
            chunk = flat[offset:offset + size].reshape(shape)
            offset += size
            if what.startswith("nmi_"):
                value = _nmi_tensor(chunk)
            else:  # (numerator, denominator) counts
                value = torch.where(chunk[1] > 0, chunk[0] / chunk[1].clamp_min(1.0), math.nan)
            tags.append(prefixes[name] + what)
            values.append(value)
        self.previous = current
        return dict(zip(tags, torch.stack(values).tolist()))  # the one host sync of the results

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The latest measure's first-choice experts of every DP rank (collective over the DP
        group: an all-gather, since DeepSpeed keeps the client state of DP rank 0 only):

            {"dp_size": int, "layers": [hookpoint names], "num_positions": int64 [dp_size],
             "first_choice": int64 [dp_size, num_layers, max_positions] (-1 padded)}

        CPU tensors; "layers" is empty before the first measure (then nothing is gathered).
        """
        dp_size = self.groups.dp_size
        if self.previous is None:
            return {"dp_size": dp_size, "layers": [], "num_positions": torch.zeros(0, dtype=torch.int64),
                    "first_choice": torch.zeros(0, dtype=torch.int64)}
        device = self.groups.device
        group = self.groups.dp_group
        names = [name for name, _, _ in self.layers]
        num = torch.tensor([self.num_positions], dtype=torch.int64, device=device)
        nums = [torch.empty_like(num) for _ in range(dp_size)]
        dist.all_gather(nums, num, group=group)
        num_positions = torch.cat(nums)
        max_positions = int(num_positions.max())
        local = torch.full((len(names), max_positions), -1, dtype=torch.int64, device=device)
        for i, name in enumerate(names):
            local[i, : self.num_positions] = self.previous[name]
        gathered = [torch.empty_like(local) for _ in range(dp_size)]
        dist.all_gather(gathered, local, group=group)
        return {"dp_size": dp_size, "layers": names, "num_positions": num_positions.cpu(),
                "first_choice": torch.stack(gathered).cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Restore this DP rank's previous assignments from `state_dict` (no communication), so
        the next measure reports stability against the last measure before the checkpoint.
        A state from a different layout (dp_size, MoE layers or probe size) cannot be matched
        position by position: it is dropped with a warning, and stability is reported again
        from the measure after next."""
        names = [name for name, _, _ in self.layers]
        if not state.get("layers"):
            self.previous = None
            return
        dp_rank, dp_size = self.groups.dp_rank, self.groups.dp_size
        saved_num = state["num_positions"]
        if (int(state["dp_size"]) != dp_size or list(state["layers"]) != names
                or int(saved_num[dp_rank]) != self.num_positions):
            logger.warning(
                "routing probe state from dp_size=%s, layers=%s, %s probe positions per rank does not match "
                "this run (dp_size=%d, layers=%s, %d positions); moe/*/stability restarts from the next measure",
                state["dp_size"], list(state["layers"]), saved_num.tolist(), dp_size, names, self.num_positions,
            )
            self.previous = None
            return
        rows = state["first_choice"][dp_rank].to(self.groups.device, torch.int64)
        self.previous = {name: rows[i, : self.num_positions].clone() for i, name in enumerate(names)}
