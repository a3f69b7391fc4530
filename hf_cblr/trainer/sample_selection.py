r"""Small-loss sample dropping: per-sample losses, the drop-fraction schedule, and which samples to keep.

Of a pool of :math:`n` samples with losses :math:`\ell_i`, a step with drop fraction :math:`f` keeps
:math:`k = n - \lfloor f n \rfloor` (at least one sample) and drops the rest:

* ``topk``: the :math:`k` largest losses (ties broken by ``torch.topk``).
* ``sampled``: as composer's SelectiveBackprop (Jiang et al. 2019, arXiv 1910.00762): samples are
  ranked by loss, sample of rank :math:`j` (0 = smallest) has percentile
  :math:`p_j = (j + 1/2) / n`, and :math:`k` of them are drawn without replacement with
  probability :math:`\propto p_j^{\,n/k - 1}` (uniform when nothing is dropped).

These functions are pure (no global state, randomness only from the ``generator`` passed in), so
that every rank, given the same gathered losses and the same seed, keeps the same samples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional

DROP_SELECTIONS = ("topk", "sampled")
DROP_SCORINGS = ("with_grad", "no_grad")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def drop_fraction_at(step: int, total_steps: int, start: float, end: float | None = None, warmup_steps: int = 0) -> float:
    r"""The drop fraction of optimizer step ``step`` (0-based) of ``total_steps``.

    Linear from 0 to ``start`` over the first ``warmup_steps`` steps, then ``start`` (constant when
    ``end`` is None) or linear from ``start`` at step ``warmup_steps`` to ``end`` at the last step
    ``total_steps - 1``.
    """
    if step < warmup_steps:
        return start * step / warmup_steps
    if end is None or total_steps - 1 <= warmup_steps:
        return start if end is None else end
    progress = min((step - warmup_steps) / (total_steps - 1 - warmup_steps), 1.0)
    return start + (end - start) * progress


def num_kept(num_samples: int, drop_fraction: float) -> int:
    """``n - floor(f n)`` samples kept of ``n`` (at least one when ``n >= 1`` and ``f < 1``)."""
    return num_samples - math.floor(drop_fraction * num_samples + 1e-9)


def select_topk(losses: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest entries of the 1-D ``losses``."""
    mask = torch.zeros(losses.shape, dtype=torch.bool, device=losses.device)
    mask[torch.topk(losses, k, sorted=False).indices] = True
    return mask


def select_sampled(losses: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Boolean mask of ``k`` entries drawn without replacement with probability ``percentile ** (n/k - 1)``."""
    n = losses.numel()
    ascending = torch.argsort(losses.detach().float().cpu(), stable=True)
    percentiles = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    probabilities = percentiles ** (n / k - 1)
    drawn = torch.multinomial(probabilities, k, replacement=False, generator=generator)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[ascending[drawn]] = True
    return mask.to(losses.device)


def select_kept(losses: Tensor, drop_fraction: float, selection: str = "topk",
                generator: torch.Generator | None = None) -> Tensor:
    """Boolean mask of the samples of the pool ``losses`` kept at ``drop_fraction`` by ``selection``."""
    if selection not in DROP_SELECTIONS:
        raise ValueError(f"drop_selection={selection!r} is not valid; valid values: {list(DROP_SELECTIONS)}")
    k = num_kept(losses.numel(), drop_fraction)
    if selection == "topk":
        return select_topk(losses, k)
    return select_sampled(losses, k, generator)


def per_sample_loss(logits: Tensor, labels: Tensor, *, problem_type: str | None = None, shift_labels: bool = False,
                    ignore_index: int = -100) -> Tensor:
    """One loss per sample, the terms whose batch mean is the usual Hugging Face loss.

    * Sequence-level logits ``[B, C]``: ``problem_type`` as in ``*ForSequenceClassification`` (inferred
      when None: ``regression`` for ``C == 1``, ``single_label_classification`` for integer labels,
      ``multi_label_classification`` otherwise): squared error (mean over outputs), cross-entropy,
      or binary cross-entropy with logits (mean over labels).
    * Token-level logits ``[B, T, C]`` with labels ``[B, T]``: each sample's cross-entropy averaged over
      its tokens whose label is not ``ignore_index`` (0 for a sample without any); ``shift_labels``
      predicts token ``t + 1`` from position ``t`` (causal language models).
    """
    if logits.ndim == 3:
        if shift_labels:
            logits, labels = logits[:, :-1], labels[:, 1:]
        token_losses = functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=ignore_index,
                                                reduction="none")
        counts = (labels != ignore_index).sum(dim=1)
        return token_losses.sum(dim=1) / counts.clamp(min=1)
    if problem_type is None:
        if logits.shape[-1] == 1:
            problem_type = "regression"
        elif not labels.is_floating_point():
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        squared = (logits.float().reshape(len(labels), -1) - labels.float().reshape(len(labels), -1)) ** 2
        return squared.mean(dim=1)
    if problem_type == "single_label_classification":
        return functional.cross_entropy(logits.float().reshape(len(labels), -1), labels.reshape(-1), reduction="none")
    if problem_type == "multi_label_classification":
        return functional.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(dim=1)
    raise ValueError(f"problem_type={problem_type!r} is not valid; valid values: {list(PROBLEM_TYPES)}")
