r"""Small-loss dropping in ``CBLRTrainer``: the glue around the pure selection of :mod:`hf_cblr.trainer.sample_selection`.

Selection pool: the samples of one micro-step on all ranks (with ``gradient_accumulation_steps = 1``, the global
batch). :meth:`SmallLossDropping.plan` gathers every pool's size once per step; :meth:`SmallLossDropping.loss`
all-gathers the pool's per-sample losses, every rank selects the same kept set, and each rank back-propagates

.. math::  L_r = \frac{W}{K} \sum_{i \in \text{kept on rank } r} \ell_i

with :math:`W` ranks and :math:`K` the samples kept over the whole step (all micro-steps, all ranks): after
DDP/DeepSpeed average over ranks and accumulate over micro-steps, the gradient is exactly that of the kept samples'
mean loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hf_cblr._distributed import rank, world_size
from hf_cblr.trainer.arguments import CBLRTrainingArguments
from hf_cblr.trainer.sample_selection import drop_fraction_at, num_kept, select_kept

#: ``per_sample_loss(inputs) -> one loss per sample``
PerSampleLoss = Callable[[dict[str, Any]], Tensor]
#: ``finish(scale, rows)``: records a forward for the curvature closure, once its kept rows and scale are known
FinishReplay = Callable[[float, Tensor], None]
#: ``begin(inputs)``: called before a forward the curvature closure may replay (None: it will not)
BeginReplay = Callable[[dict[str, Any]], FinishReplay | None]


@dataclass
class DropStep:
    """One optimizer step's selection pools: their sample counts, the loss scale ``W / K``, the fraction dropped."""

    pool_sizes: list[list[int]] = field(default_factory=list)  # [micro-step][rank]
    loss_scale: float = 1.0
    drop_fraction: float = 0.0
    micro_step: int = 0


class SmallLossDropping:
    """Drops the samples of smallest loss from every selection pool (``drop_fraction`` and its related arguments)."""

    def __init__(self, args: CBLRTrainingArguments) -> None:
        self.args = args
        #: the current step's pools; None before the first step of the training loop
        self.step: DropStep | None = None
        self._log = [0, 0, 0.0, 0]  # kept, seen, sum of thresholds, pools

    def plan(self, batch_samples: list[dict[str, Any]], device: torch.device, global_step: int, max_steps: int) -> None:
        """A new step: the pool sizes of every micro-step on every rank, and the step's loss scale ``W / K``."""
        local = torch.tensor([num_samples(batch) for batch in batch_samples], device=device)
        ranks = world_size()
        if ranks > 1:
            gathered = [torch.empty_like(local) for _ in range(ranks)]
            dist.all_gather(gathered, local)
            local = torch.stack(gathered)
        else:
            local = local.unsqueeze(0)
        step = DropStep(pool_sizes=local.T.tolist())
        args = self.args
        step.drop_fraction = drop_fraction_at(global_step, max_steps, args.drop_fraction, args.drop_fraction_end,
                                              args.drop_warmup_steps)
        step.loss_scale = ranks / sum(num_kept(sum(sizes), step.drop_fraction) for sizes in step.pool_sizes)
        self.step = step

    def loss(self, inputs: dict[str, Any], per_sample_loss: PerSampleLoss, global_step: int,
             begin_replay: BeginReplay) -> Tensor:
        """``(W / K) x`` the sum of this rank's kept per-sample losses of the current micro-step."""
        step = self.step
        assert step is not None, "plan() starts every step"
        micro_step = step.micro_step
        step.micro_step += 1
        if self.args.drop_scoring == "with_grad":
            finish = begin_replay(inputs)
            losses = per_sample_loss(inputs)
            kept = self._select(losses.detach(), micro_step, global_step)
            if finish is not None:
                finish(step.loss_scale, kept)
            return losses[kept].sum() * step.loss_scale
        with torch.no_grad():
            scores = per_sample_loss(inputs)
        kept = self._select(scores, micro_step, global_step)
        # A rank that keeps nothing still runs a forward and backward (weight 0), as DDP and DeepSpeed expect.
        weight = step.loss_scale if kept.numel() else 0.0
        rows = kept if kept.numel() else kept.new_zeros(1)
        kept_inputs = select_rows(inputs, rows, len(scores))
        finish = begin_replay(kept_inputs)
        loss = per_sample_loss(kept_inputs).sum() * weight
        if finish is not None:
            finish(weight, torch.arange(len(rows), device=rows.device))
        return loss

    def _select(self, scores: Tensor, micro_step: int, global_step: int) -> Tensor:
        """Indices (into this rank's micro-batch) of the samples kept in the pool of ``micro_step``."""
        assert self.step is not None
        sizes = self.step.pool_sizes[micro_step]
        pool = scores.float()
        if len(sizes) > 1:
            padded = pool.new_zeros(max(sizes))
            padded[: len(pool)] = pool
            gathered = [torch.empty_like(padded) for _ in sizes]
            dist.all_gather(gathered, padded)
            pool = torch.cat([values[:size] for values, size in zip(gathered, sizes, strict=True)])
        pool = pool.cpu()
        generator = torch.Generator().manual_seed(hash((self.args.seed, global_step, micro_step)) & (2**63 - 1))
        mask = select_kept(pool, self.step.drop_fraction, self.args.drop_selection, generator)
        self._log[0] += int(mask.sum())
        self._log[1] += len(pool)
        self._log[2] += float(pool[mask].min())
        self._log[3] += 1
        offset = sum(sizes[: rank()])
        return mask[offset: offset + len(scores)].nonzero().squeeze(1).to(scores.device)

    def log_entries(self) -> dict[str, float]:
        """``drop_fraction``, ``kept_fraction`` (kept / seen since the last log) and ``drop_loss_threshold`` (the mean
        over pools of the smallest kept loss); empty when no pool was selected since the last log."""
        kept, seen, thresholds, pools = self._log
        if not pools:
            return {}
        self._log = [0, 0, 0.0, 0]
        return {"drop_fraction": self.step.drop_fraction if self.step is not None else 0.0, "kept_fraction": kept / seen,
                "drop_loss_threshold": thresholds / pools}


def num_samples(batch: Mapping[str, Any]) -> int:
    """The number of samples of a collated batch: the length of its labels (or of its first tensor)."""
    if isinstance(batch.get("labels"), Tensor):
        return len(batch["labels"])
    return next(len(value) for value in batch.values() if isinstance(value, Tensor) and value.ndim)


def select_rows(inputs: dict[str, Any], rows: Tensor, batch_size: int) -> dict[str, Any]:
    """The rows ``rows`` of every tensor of ``inputs`` whose first dimension is the batch."""
    return {key: value[rows.to(value.device)] if isinstance(value, Tensor) and value.ndim and len(value) == batch_size
            else value for key, value in inputs.items()}
