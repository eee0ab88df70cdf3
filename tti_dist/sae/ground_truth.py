"""Ground-truth scores of a dictionary's latents on the synthetic language, for `tti eval` and `tti sae fit`.

The model runs on token batches that carry the corpus's factor columns; the dictionary
(an SAE or a transcoder: anything whose forward on the site's activation returns an object
with `.latents`, local to this TP rank) encodes the captured activation, the latents are
gathered to full width over TP (and the tokens over DP), and
tti_dist.metrics.dictionary_scoring scores them against the factor indicators of each input
token: best-match MCC and per-feature best-latent F1 (docs/metrics.md#ground-truth-dictionary-scoring).

Communication: one all-gather of the latents [tokens, n/tp] over TP per batch; with DP, one
all-gather of all latents and factor columns over DP at the end. Memory: the gathered
latents of the scored tokens ([tokens, n] float32 on every rank), so the caller bounds the
tokens (eval_batches / --batches).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from tti_dist.capture.hookpoints import ActivationCapture
from tti_dist.distributed.collectives import all_gather_concat
from tti_dist.metrics.dictionary_scoring import dictionary_scoring_tags, score_dictionary


def factor_columns(batch: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """The factor columns (`factor_<name>`) of a batch; () on a corpus without ground truth."""
    return tuple(c for c in batch if c.startswith("factor_"))


@torch.no_grad()
def ground_truth_scores(model, encode: Callable[[torch.Tensor], torch.Tensor], site, batches: Iterable[dict],
                        groups, prefix: str) -> dict[str, float]:
    """`<prefix>gt_*` tags of the latents `encode(activation)` returns at `site`, over `batches`.

    batches: dicts with "tokens" [B, T+1] and the factor columns [B, T+1]; the factor of each
    input token is scored (targets are shifted by one). encode: the site's activation ->
    this TP rank's latents [..., n/tp]. Every rank returns the same tags; {} without factor
    columns. Collective over TP and DP.
    """
    batches = list(batches)
    columns = factor_columns(batches[0]) if batches else ()
    if not columns:
        return {}
    latents, labels = [], {c: [] for c in columns}
    with ActivationCapture([site]) as capture:
        for batch in batches:
            model(batch["tokens"][:, :-1].to(groups.device))
            f = encode(capture.captured[site.name].detach()).float()
            capture.clear()
            if groups.tp_size > 1:
                f = all_gather_concat(f, groups.tp_group, dim=-1)
            latents.append(f.reshape(-1, f.shape[-1]))
            for c in columns:
                labels[c].append(batch[c][:, :-1].reshape(-1).to(groups.device))
    z = torch.cat(latents)
    factors = {c: torch.cat(v) for c, v in labels.items()}
    if groups.dp_size > 1:  # every DP rank scores the same number of equal-shape batches
        z = all_gather_concat(z, groups.dp_group, dim=0)
        factors = {c: all_gather_concat(v, groups.dp_group, dim=0) for c, v in factors.items()}
    scores = score_dictionary(z.cpu(), {c.removeprefix("factor_"): v.cpu() for c, v in factors.items()})
    return dictionary_scoring_tags(prefix, scores)
