"""Next-token tasks on the synthetic factored language, for `tti circuit` (circuit size by pruning).

A task picks, in a batch of validation windows, the input positions where the next token
is predictable from one ground-truth factor, and for each such position a small set of
classes (each class a set of token ids) with the correct class. The task loss of a model
is the cross entropy over those classes only:

    logit_c(b, t) = logsumexp_{v in S_c} z_v(b, t)            (z: the model's next-token logits)
    L_task = mean over examples of  -log softmax_c(logit_c)[label]

With one token per class and two classes this is the contrast loss of Gao et al. 2025
("Weight-sparse transformers have interpretable circuits", arXiv:2511.13653; the
`last_token_contrast_loss_fn` of openai/circuit_sparsity's registries.py: a log-softmax
over the logits of the correct and the alternative token), taken at every chosen position
of a window rather than only at the last one.

A task is a function (tokens [B, T+1], factor columns [B, T+1], VocabLayout) ->
`TaskExamples`. Position t is an input position (0 <= t < T): the model reads tokens[:, :t+1]
and the target is tokens[:, t+1], so targets and their factors are read at t+1.

The tasks (`TASKS`):

- `verb_number`: positions whose next token is a verb (role = verb at t+1) and whose
  subject lies in the window (a subject token at some s <= t with no `.` or `<eos>` in
  (s, t]); classes = the singular and the plural form of that verb (same topic, lemma and
  negation, the two ids differ only in number); label = the verb's number (0 sg, 1 pl).
  The verb agrees with its subject, one to three tokens back (modifier-free, `NOT` and
  noise in between), so the label is exactly predictable from the subject and from
  nothing else in the sentence. Chance loss log 2; the sg:pl balance is about 70:30.
- `topic`: positions whose next token is a noun (role subj or obj at t+1) in a document
  whose topic the window has already shown (a subject, verb or object token of the same
  document at some s <= t, i.e. with no `<eos>` in (s, t]); classes = the topics, class k
  = every noun id of topic k (all lemmas, both numbers); label = the document's topic.
  Nouns of other topics never occur in the document, so the label is exactly predictable
  from any earlier content token of the document. Chance loss log K.

`random_labels` is the control task of each (the nonsense task): the same positions and
classes with the labels permuted among the examples by a fixed seed, so every class keeps
exactly its count while the label no longer depends on the input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from tti_dist.data.synthetic_vocab import (
    EOS_ID,
    PUNCT_ID,
    ROLE_OBJ,
    ROLE_SUBJ,
    ROLE_VERB,
    VocabLayout,
)


@dataclass(frozen=True)
class TaskExamples:
    """The examples of a task in one batch of windows."""

    rows: torch.Tensor
    """[N] int64: window (row of the batch) of each example."""
    positions: torch.Tensor
    """[N] int64: input position t; the target token is at t + 1."""
    classes: torch.Tensor
    """[N, C, M] int64: the token ids of each class (M ids per class; the same M for all)."""
    labels: torch.Tensor
    """[N] int64: the correct class, 0..C-1."""

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def num_classes(self) -> int:
        return int(self.classes.shape[1])


def _last_index(mask_BT: torch.Tensor) -> torch.Tensor:
    """[B, T]: the largest index s <= t with mask[b, s] true, or -1 (a running max)."""
    idx = torch.arange(mask_BT.shape[1]).expand_as(mask_BT)
    return torch.where(mask_BT, idx, torch.full_like(idx, -1)).cummax(dim=1).values


def verb_number(tokens: torch.Tensor, factors: dict[str, torch.Tensor], layout: VocabLayout) -> TaskExamples:
    """Predict the verb's number (sg/pl) at the position before it; see the module docstring."""
    role = factors["factor_role"]
    inp = slice(0, tokens.shape[1] - 1)
    nxt = slice(1, tokens.shape[1])
    last_subj = _last_index(role[:, inp] == ROLE_SUBJ)
    tok_in = tokens[:, inp]
    last_boundary = _last_index((tok_in == PUNCT_ID) | (tok_in == EOS_ID))
    chosen = (role[:, nxt] == ROLE_VERB) & (last_subj > last_boundary)
    rows, positions = chosen.nonzero(as_tuple=True)
    verb = tokens[rows, positions + 1]
    number = factors["factor_number"][rows, positions + 1]
    # verb id = verb_base + ((topic * V + lemma) * 2 + number) * 2 + negated: the two
    # numbers of the same verb lie 2 ids apart.
    singular = verb - 2 * number
    classes = torch.stack([singular, singular + 2], dim=1).unsqueeze(-1)
    return TaskExamples(rows, positions, classes, number.long())


def topic(tokens: torch.Tensor, factors: dict[str, torch.Tensor], layout: VocabLayout) -> TaskExamples:
    """Predict the document's topic at the position before a noun; see the module docstring."""
    role = factors["factor_role"]
    inp = slice(0, tokens.shape[1] - 1)
    nxt = slice(1, tokens.shape[1])
    role_in = role[:, inp]
    content = (role_in == ROLE_SUBJ) | (role_in == ROLE_VERB) | (role_in == ROLE_OBJ)
    last_content = _last_index(content)
    last_eos = _last_index(tokens[:, inp] == EOS_ID)
    next_role = role[:, nxt]
    chosen = ((next_role == ROLE_SUBJ) | (next_role == ROLE_OBJ)) & (last_content > last_eos)
    rows, positions = chosen.nonzero(as_tuple=True)
    labels = factors["factor_topic"][rows, positions + 1].long()
    per_topic = 2 * layout.nouns_per_topic
    class_ids = layout.noun_base + torch.arange(layout.num_topics * per_topic).view(layout.num_topics, per_topic)
    classes = class_ids.unsqueeze(0).expand(len(labels), -1, -1)
    return TaskExamples(rows, positions, classes, labels)


TaskFn = Callable[[torch.Tensor, dict[str, torch.Tensor], VocabLayout], TaskExamples]

TASKS: dict[str, TaskFn] = {"topic": topic, "verb_number": verb_number}
"""The tasks by name (`tti circuit --task`)."""

RANDOM_LABEL_SEED = 20251117
"""Seed of the label permutation of the random-label control (fixed: the same nonsense task every time)."""


def random_labels(examples: list[TaskExamples], seed: int = RANDOM_LABEL_SEED) -> list[TaskExamples]:
    """The nonsense control of a task: the labels of all examples (over every batch together)
    permuted by a fixed seed; positions and classes unchanged, so each class keeps its count."""
    labels = torch.cat([e.labels for e in examples])
    gen = torch.Generator().manual_seed(seed)
    permuted = labels[torch.randperm(len(labels), generator=gen)]
    out, start = [], 0
    for e in examples:
        out.append(replace(e, labels=permuted[start:start + len(e)]))
        start += len(e)
    return out


def class_logits(logits_BTV: torch.Tensor, ex: TaskExamples) -> torch.Tensor:
    """[N, C]: logit of each class, logsumexp of its tokens' next-token logits (fp32)."""
    z = logits_BTV[ex.rows, ex.positions].float()          # [N, V]
    n, c, m = ex.classes.shape
    picked = z.gather(1, ex.classes.reshape(n, c * m)).view(n, c, m)
    return picked.logsumexp(dim=-1)


def task_loss(logits_BTV: torch.Tensor, ex: TaskExamples) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross entropy over the classes, number correct) of the examples in one batch."""
    cl = class_logits(logits_BTV, ex)
    loss = torch.nn.functional.cross_entropy(cl, ex.labels, reduction="sum")
    correct = (cl.argmax(dim=-1) == ex.labels).sum()
    return loss, correct
