r"""Global batch-size schedules keyed to consumed samples, and the batch sampler that follows one.

A schedule gives the global batch size :math:`B_k` of optimizer step :math:`k` from the number of
samples consumed before it, :math:`c_k = \sum_{j<k} B_j` (and, for explicit lists, from :math:`k`).
Because :math:`c_{k+1} = c_k + B(c_k, k)` is deterministic, the whole plan :math:`B_0, B_1, \dots`
follows from the schedule alone, so a resumed run continues it exactly.

Grammar of ``batch_size_schedule`` (integers; ``_`` separators allowed; spaces ignored):

``linear:START,INCREMENT,RAMP_SAMPLES``
    Megatron-LM's ``--rampup-batch-size START INCREMENT RAMP_SAMPLES``: start at ``START``, grow by
    ``INCREMENT`` in :math:`n = (B_{full} - START) / INCREMENT` equal sample intervals over the first
    ``RAMP_SAMPLES`` samples, then stay at the full batch :math:`B_{full}`:
    :math:`B(c) = START + \lfloor c\, n / RAMP\_SAMPLES \rfloor \cdot INCREMENT` for
    :math:`c \le RAMP\_SAMPLES`, :math:`B_{full}` after. ``INCREMENT`` must divide
    :math:`B_{full} - START`.
``milestones:S0=B0,S1=B1,...``
    Piecewise constant in consumed samples: :math:`B(c) = B_i` for the last :math:`S_i \le c`.
    ``S0`` must be 0 and the :math:`S_i` strictly increasing.
``list:B0,B1,...``
    Per optimizer step: step :math:`k` uses :math:`B_k`; an item ``B*N`` stands for ``N`` steps of
    ``B``; after the list, its last size continues.

The full batch :math:`B_{full}` is ``per_device_train_batch_size x world_size x
gradient_accumulation_steps`` (what the stock Trainer uses every step): the target of ``linear`` and
the largest batch any schedule may take. Every scheduled size must be a multiple of ``world_size x
gradient_accumulation_steps``: each of the step's micro-batches then has the same size
:math:`B_k / (world\_size \cdot gradient\_accumulation\_steps)` on every rank (at most
``per_device_train_batch_size``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise

import torch
from torch.utils.data import Sampler

LR_SCALINGS = ("none", "linear", "sqrt")
#: The most steps a ``list:`` schedule may spell out (its last size continues after it).
MAX_LISTED_STEPS = 1_000_000
SCHEDULE_KINDS = ("linear", "milestones", "list")
GRAMMAR = "'linear:START,INCREMENT,RAMP_SAMPLES', 'milestones:0=B0,S1=B1,...' or 'list:B0,B1*N,...'"


@dataclass(frozen=True)
class LinearRamp:
    """Megatron-LM's batch-size ramp-up from ``start`` to the full batch over ``ramp_samples`` samples."""

    start: int
    increment: int
    ramp_samples: int

    def global_batch_size(self, consumed_samples: int, step: int, full_batch_size: int) -> int:
        if consumed_samples > self.ramp_samples:
            return full_batch_size
        increments = (full_batch_size - self.start) // self.increment
        return self.start + consumed_samples * increments // self.ramp_samples * self.increment

    def sizes(self, full_batch_size: int) -> list[int]:
        if self.start > full_batch_size or (full_batch_size - self.start) % self.increment:
            raise ValueError(
                f"batch_size_schedule linear:{self.start},{self.increment},{self.ramp_samples} does not reach the full "
                f"batch {full_batch_size} (per_device_train_batch_size x world_size x gradient_accumulation_steps): "
                f"START must be <= {full_batch_size} and INCREMENT must divide {full_batch_size} - START"
            )
        return list(range(self.start, full_batch_size + 1, self.increment))


@dataclass(frozen=True)
class Milestones:
    """Piecewise-constant batch sizes from consumed-sample milestones ``((0, B0), (S1, B1), ...)``."""

    points: tuple[tuple[int, int], ...]

    def global_batch_size(self, consumed_samples: int, step: int, full_batch_size: int) -> int:
        return next(size for start, size in reversed(self.points) if start <= consumed_samples)

    def sizes(self, full_batch_size: int) -> list[int]:
        return [size for _, size in self.points]


@dataclass(frozen=True)
class StepList:
    """Explicit per-step batch sizes; the last one continues after the list."""

    batch_sizes: tuple[int, ...]

    def global_batch_size(self, consumed_samples: int, step: int, full_batch_size: int) -> int:
        return self.batch_sizes[min(step, len(self.batch_sizes) - 1)]

    def sizes(self, full_batch_size: int) -> list[int]:
        return sorted(set(self.batch_sizes))


@dataclass(frozen=True)
class FullBatch:
    """The full batch at every step: the plan of a run without a schedule whose batches the sampler still
    draws (``group_by_length``)."""

    def global_batch_size(self, consumed_samples: int, step: int, full_batch_size: int) -> int:
        return full_batch_size

    def sizes(self, full_batch_size: int) -> list[int]:
        return [full_batch_size]


BatchSizeSchedule = LinearRamp | Milestones | StepList | FullBatch


def _integer(text: str, what: str, spec: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"batch_size_schedule={spec!r}: {what} {text!r} is not an integer; grammar: {GRAMMAR}") from None
    if value < minimum:
        raise ValueError(f"batch_size_schedule={spec!r}: {what} must be >= {minimum}, got {value}")
    return value


def parse_batch_size_schedule(spec: str) -> BatchSizeSchedule:
    """Parse a schedule string (grammar in the module docstring); ``ValueError`` naming the problem otherwise."""
    kind, separator, body = spec.replace(" ", "").partition(":")
    if not separator or kind not in SCHEDULE_KINDS or not body:
        raise ValueError(f"batch_size_schedule={spec!r} is not valid; kinds: {list(SCHEDULE_KINDS)}; grammar: {GRAMMAR}")
    items = body.split(",")
    if kind == "linear":
        if len(items) != 3:
            raise ValueError(f"batch_size_schedule={spec!r}: linear takes START,INCREMENT,RAMP_SAMPLES; grammar: {GRAMMAR}")
        start, increment, ramp = (_integer(item, name, spec, 1) for item, name in
                                  zip(items, ("START", "INCREMENT", "RAMP_SAMPLES"), strict=True))
        return LinearRamp(start, increment, ramp)
    if kind == "milestones":
        points = []
        for item in items:
            samples, equals, size = item.partition("=")
            if not equals:
                raise ValueError(f"batch_size_schedule={spec!r}: milestone {item!r} is not SAMPLES=BATCH; grammar: {GRAMMAR}")
            points.append((_integer(samples, "milestone", spec, 0), _integer(size, "batch size", spec, 1)))
        starts = [start for start, _ in points]
        if starts[0] != 0 or any(a >= b for a, b in pairwise(starts)):
            raise ValueError(f"batch_size_schedule={spec!r}: milestones must start at 0 and strictly increase, got {starts}")
        return Milestones(tuple(points))
    parsed = []
    for item in items:
        size, star, count = item.partition("*")
        parsed.append((_integer(size, "batch size", spec, 1), _integer(count, "repeat count", spec, 1) if star else 1))
    listed = sum(count for _, count in parsed)
    if listed > MAX_LISTED_STEPS:
        raise ValueError(f"batch_size_schedule={spec!r} lists {listed} steps; at most {MAX_LISTED_STEPS} (the list's last "
                         "size continues after it: list the steps that change, or use 'linear' or 'milestones')")
    return StepList(tuple(size for size, count in parsed for _ in range(count)))


def validate_batch_size_schedule(schedule: BatchSizeSchedule, full_batch_size: int, multiple_of: int) -> None:
    """Every size must be a positive multiple of ``multiple_of`` (world size x accumulation) and <= the full batch."""
    for size in schedule.sizes(full_batch_size):
        if size % multiple_of or size > full_batch_size:
            raise ValueError(
                f"batch_size_schedule takes global batch {size}, which must be a multiple of world_size x "
                f"gradient_accumulation_steps = {multiple_of} and at most per_device_train_batch_size x world_size x "
                f"gradient_accumulation_steps = {full_batch_size}"
            )


def batch_size_plan(schedule: BatchSizeSchedule, full_batch_size: int, *, max_steps: int | None = None,
                    total_samples: int | None = None) -> list[int]:
    """The global batch size of every step: ``max_steps`` steps, or as many as it takes to consume ``total_samples``.

    With ``total_samples`` the last step still takes its full scheduled batch, so the plan may
    consume up to one batch more than asked.
    """
    if (max_steps is None) == (total_samples is None):
        raise ValueError("give exactly one of max_steps and total_samples")
    plan: list[int] = []
    consumed = 0
    while (len(plan) < max_steps) if max_steps is not None else (consumed < total_samples):
        size = schedule.global_batch_size(consumed, len(plan), full_batch_size)
        plan.append(size)
        consumed += size
    return plan


def consumed_samples(plan: Sequence[int]) -> list[int]:
    """``c_k``, the samples consumed before step ``k``, for ``k = 0 .. len(plan)``."""
    return [0, *accumulate(plan)]


def lr_scale(batch_size: int, full_batch_size: int, scaling: str) -> float:
    r"""The learning-rate factor of a step of global batch ``B``: 1, :math:`B / B_{full}` or :math:`\sqrt{B / B_{full}}`."""
    if scaling not in LR_SCALINGS:
        raise ValueError(f"batch_size_lr_scaling={scaling!r} is not valid; valid values: {list(LR_SCALINGS)}")
    ratio = batch_size / full_batch_size
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[scaling]


class ScheduledBatchSampler(Sampler[list[int]]):
    """Batches of sample indices that follow a plan of global batch sizes, for every rank at once.

    The samples form one stream: the permutations of epochs 0, 1, 2, ... (``torch.randperm`` seeded
    with ``seed + epoch``; ``arange`` when not shuffling) concatenated, so a global batch may span two
    epochs. Step ``k`` takes the next ``plan[k]`` indices and yields them as ``chunks_per_step`` equal
    consecutive chunks, chunk ``i * world_size + r`` being micro-batch ``i`` of rank ``r``: with
    ``chunks_per_step = world_size x gradient_accumulation_steps`` Accelerate's ``BatchSamplerShard``
    (which deals batch ``j`` to rank ``j % world_size``) hands every rank its micro-batches in order.

    With ``lengths`` (one per sample: its token count), each global batch is ordered by decreasing
    length before it is cut into chunks, so that a micro-batch holds samples of similar length and
    dynamic padding pads little. Which samples form a global batch does not change, so neither does
    the step's gradient (the sum over the batch); only the grouping into micro-batches does.
    """

    #: Batch sizes vary: tells Accelerate's ``BatchSamplerShard`` not to wait for full batches.
    batch_size = None

    def __init__(self, num_samples: int, plan: Sequence[int], chunks_per_step: int, *, seed: int = 0,
                 shuffle: bool = True, lengths: Sequence[int] | None = None) -> None:
        if num_samples < 1:
            raise ValueError(f"the training set is empty (num_samples={num_samples})")
        bad = [size for size in plan if size < 1 or size % chunks_per_step]
        if bad:
            raise ValueError(f"global batch sizes {sorted(set(bad))} are not positive multiples of {chunks_per_step}")
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"lengths has {len(lengths)} entries for {num_samples} samples")
        self.num_samples = num_samples
        self.plan = list(plan)
        self.chunks_per_step = chunks_per_step
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.plan) * self.chunks_per_step

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order, position = 0, self._epoch_order(0), 0
        for size in self.plan:
            batch: list[int] = []
            while len(batch) < size:
                if position == self.num_samples:
                    epoch, position = epoch + 1, 0
                    order = self._epoch_order(epoch)
                taken = order[position:position + size - len(batch)]
                batch += taken
                position += len(taken)
            if self.lengths is not None:
                batch.sort(key=self.lengths.__getitem__, reverse=True)  # stable: ties keep the stream's order
            chunk = size // self.chunks_per_step
            for start in range(0, size, chunk):
                yield batch[start:start + chunk]
