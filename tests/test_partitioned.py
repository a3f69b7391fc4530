"""The flat-partition layer source (``hf_cblr.optim.partitioned``) in one process, with a fake distributor.

Ranks are threads: each steps its own optimizer on its flat partition, as under DeepSpeed, and a fake
:class:`~hf_cblr.optim.partitioned.PartitionLayout` tells it where the layers lie (the ZeRO-1/2 flat buffer, or ZeRO-3's
per-parameter slices) and sums over the threads instead of the ranks. The partitions, put back together, must give the
parameters of one process stepping whole layers, and the state must be stored in the partition by its declared kind.
The 2-rank gloo tests with DeepSpeed itself are ``tests/test_deepspeed_zero.py``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from hf_cblr.optim import get_optimizer_info
from hf_cblr.optim.estimators import SecantCurvature, register_curvature_estimator
from hf_cblr.optim.partitioned import LAYERS_KEY, ROWS_KEY, zero3_fragments, zero12_fragments
from hf_cblr.optim.types import LayerBatch, LayerFragment, Prelude, StateKind

SHAPES = [(5, 7), (7,), (3, 7), (3,), (4, 3)]  # odd sizes: layers cut across the partition boundaries


class ThreadedSum:
    """``all_reduce_sum`` over ``world`` threads: every thread gets the sum of all threads' tensors, in rank order;
    ``calls[rank]`` counts the all-reduces of each thread."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world)
        self.slots: list[Tensor | None] = [None] * world
        self.calls = [0] * world

    def for_rank(self, rank: int) -> SimpleNamespace:
        def all_reduce_sum(tensor: Tensor) -> Tensor:
            self.calls[rank] += 1
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()  # every thread has read the slots before any writes the next ones
            return tensor.copy_(total)

        return SimpleNamespace(all_reduce_sum=all_reduce_sum)


class FakeLayout:
    """Rank ``rank`` of ``world``: ZeRO-1/2 (one flat buffer of the layers cut into equal parts) or ZeRO-3 (every layer
    cut into ``ceil(numel / world)``-element slices, rank ``r`` holding slice ``r`` of each)."""

    def __init__(self, stage: int, rank: int, world: int, distributor: SimpleNamespace) -> None:
        self.stage, self.rank, self.world, self.distributor = stage, rank, world, distributor

    def holds_partition(self, params: list[Tensor], layers: list[Tensor]) -> bool:
        return len(params) == 1 and params[0] is not layers[0]

    def fragments(self, flat: Tensor, layers: list[Tensor]) -> tuple[list[LayerFragment], SimpleNamespace]:
        indices = list(range(len(layers)))
        if self.stage == 3:
            metas = [SimpleNamespace(partition_numel=partial(_slice_size, p.numel(), self.world), ds_numel=p.numel(),
                                     ds_shape=tuple(p.shape)) for p in layers]
            return zero3_fragments(metas, indices, self.rank), self.distributor
        return zero12_fragments(layers, indices, self.rank * flat.numel(), flat.numel()), self.distributor


def _slice_size(numel: int, world: int) -> int:
    """ZeRO-3's slice of a layer on each rank: ``ceil(numel / world)`` elements, the last rank's padded."""
    return math.ceil(numel / world)


def _layers(flat_buffer: Tensor | None = None) -> list[nn.Parameter]:
    """The layers, as views of ``flat_buffer`` (ZeRO-1/2 keeps a group's parameters in one buffer) or on their own."""
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(shape, generator=generator) for shape in SHAPES]
    if flat_buffer is None:
        return [nn.Parameter(value) for value in values]
    offset, layers = 0, []
    for value in values:
        view = flat_buffer.narrow(0, offset, value.numel()).view(value.shape)
        view.copy_(value)
        layers.append(nn.Parameter(view))
        offset += value.numel()
    return layers


def _grads(step: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def _partition_of(values: list[Tensor], stage: int, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s flat partition of the layers' ``values`` (weights or gradients)."""
    if stage == 3:
        parts = []
        for value in values:
            size = math.ceil(value.numel() / world)
            part = torch.zeros(size)
            piece = value.reshape(-1)[rank * size: (rank + 1) * size]
            part[: piece.numel()] = piece
            parts.append(part)
        return torch.cat(parts)
    flat = torch.cat([value.reshape(-1) for value in values])
    size = math.ceil(flat.numel() / world)
    padded = torch.zeros(size * world)
    padded[: flat.numel()] = flat
    return padded[rank * size: (rank + 1) * size].clone()


def _layers_from(partitions: list[Tensor], stage: int) -> list[Tensor]:
    """The layers put back together from all ranks' partitions."""
    world = len(partitions)
    if stage == 3:
        layers, offset = [], 0
        for shape in SHAPES:
            numel = math.prod(shape)
            size = math.ceil(numel / world)
            layers.append(torch.cat([p[offset: offset + size] for p in partitions])[:numel].view(shape))
            offset += size
        return layers
    flat = torch.cat(partitions)
    return [chunk.view(shape) for chunk, shape in zip(flat.split([math.prod(s) for s in SHAPES]), SHAPES, strict=False)]


def _build(name: str, layers: list[Tensor], layout: FakeLayout | None = None, **kwargs: Any) -> torch.optim.Optimizer:
    info = get_optimizer_info(name)
    names = [f"layer{i}" for i in range(len(layers))]
    return info.optimizer_class([{"params": layers, "param_names": names}], partition_layout=layout,
                                **info.arguments(**kwargs))


def _run_ranks(world: int, work: Callable[[int], Any]) -> list[Any]:
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = work(rank)
        except BaseException as error:  # re-raised in the test's thread
            errors.append(error)
            raise

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


CASES = {
    "cblr": ("cblr", {"lr": 0.1, "curvature": "secant", "weight_decay": 0.01}),
    "cblr_adam": ("cblr_adam", {"lr": 1e-2, "curvature": "secant", "trust": 1.0, "weight_decay": 0.01}),
    "cblr_nesterov": ("cblr", {"lr": 0.1, "curvature": "secant", "nesterov": True, "weight_decay": 0.01}),
    "cblr_dampened": ("cblr", {"lr": 0.1, "curvature": "weight_norm", "dampening": 0.5}),
    "cblr_no_momentum": ("cblr", {"lr": 0.1, "curvature": "secant", "momentum": 0.0, "weight_decay": 0.01}),
    "mclr": ("mclr", {"lr": 0.1, "sample_size": 8, "weight_decay": 0.01}),
    "mclr_adam": ("mclr_adam", {"lr": 1e-2, "sample_size": 8, "weight_decay": 0.01}),
    "cblr_adam_sampled": ("cblr_adam", {"lr": 1e-2, "curvature": "secant_sampled", "sample_size": 8, "weight_decay": 0.01}),
    "lars": ("lars", {"lr": 1.0, "weight_decay": 0.01}),
    "lamb": ("lamb", {"lr": 1e-2, "weight_decay": 0.01}),
}
STEPS = 4


def _partitioned_run(case: str, stage: int, world: int, distributor: ThreadedSum | None = None,
                     fused: bool | None = None) -> tuple[list[Tensor], list[dict[str, Any]]]:
    name, kwargs = CASES[case]
    kwargs = {**kwargs, "fused": fused}
    total = sum(math.prod(shape) for shape in SHAPES)
    distributor = ThreadedSum(world) if distributor is None else distributor

    def rank_work(rank: int) -> tuple[Tensor, dict[str, Any]]:
        buffer = torch.zeros(math.ceil(total / world) * world) if stage != 3 else None
        layers = _layers(buffer)
        optimizer = _build(name, layers, FakeLayout(stage, rank, world, distributor.for_rank(rank)), **kwargs)
        partition = _partition_of([layer.detach() for layer in layers], stage, rank, world)
        optimizer.param_groups[0]["params"] = [partition]  # what ZeRO does to the optimizer's groups
        for step in range(STEPS):
            partition.grad = _partition_of(_grads(step), stage, rank, world)
            optimizer.step()
        return partition, optimizer.state[partition]

    results = _run_ranks(world, rank_work)
    return _layers_from([partition for partition, _ in results], stage), [state for _, state in results]


def _whole_layers_run(case: str) -> list[Tensor]:
    name, kwargs = CASES[case]
    layers = _layers()
    optimizer = _build(name, layers, **kwargs)
    for step in range(STEPS):
        for layer, grad in zip(layers, _grads(step), strict=True):
            layer.grad = grad
        optimizer.step()
    return [layer.detach() for layer in layers]


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("world", [2, 3])
def test_fragments_cover_every_element_of_every_layer_once(stage: int, world: int) -> None:
    """The fragments of all ranks' partitions, read back, are the layers, element for element."""
    total = sum(math.prod(shape) for shape in SHAPES)
    pieces: dict[int, list[tuple[int, Tensor]]] = {}
    for rank in range(world):
        buffer = torch.zeros(math.ceil(total / world) * world)
        layers = _layers(buffer if stage != 3 else None)
        partition = _partition_of([layer.detach() for layer in layers], stage, rank, world)
        fragments, _ = FakeLayout(stage, rank, world, SimpleNamespace()).fragments(partition, layers)
        assert [f.index for f in fragments] == list(range(len(SHAPES)))
        for f in fragments:
            assert f.offset + f.length <= partition.numel()
            pieces.setdefault(f.index, []).append((f.layer_start, partition[f.offset: f.offset + f.length]))
    for index, layer in enumerate(_layers()):
        starts_and_values = sorted(pieces[index], key=lambda piece: piece[0])
        rebuilt = torch.cat([values for _, values in starts_and_values])
        torch.testing.assert_close(rebuilt, layer.detach().reshape(-1), rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, None])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("stage", "world"), [(2, 2), (2, 3), (3, 2), (3, 3)])
def test_partitioned_step_equals_the_whole_layers_step(case: str, stage: int, world: int, fused: bool | None) -> None:
    """Layer norms reduced over the ranks give every rank the rates of one process: the parameters match, on the
    foreach kernels and on the default (on the CPU the fused kernels, whose sums on fragments are partial)."""
    partitioned, _ = _partitioned_run(case, stage, world, fused=fused)
    for got, expected in zip(partitioned, _whole_layers_run(case), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, None])
@pytest.mark.parametrize("case", sorted(CASES))
def test_one_all_reduce_per_step_and_partition(case: str, fused: bool | None) -> None:
    """Every sum a step needs (the norms of the direction, the estimator's, the update's, MCLR's element samples) goes
    over the ranks in one all-reduce per step of a partition, on every rank: none per layer, none after the rates;
    on both kernels."""
    distributor = ThreadedSum(2)
    _partitioned_run(case, stage=2, world=2, distributor=distributor, fused=fused)
    assert distributor.calls == [STEPS, STEPS]


def test_state_is_stored_in_the_partition_by_its_declared_kind() -> None:
    """Per-layer scalars as ``[num_layers]`` vectors, element state shaped like the partition, sample rows as rows."""
    _, states = _partitioned_run("mclr_adam", stage=2, world=2)
    for state in states:
        assert set(state[LAYERS_KEY]) == {"step", "curvature", "update_norm"}
        assert all(vector.shape == (len(SHAPES),) for vector in state[LAYERS_KEY].values())
        partition_numel = math.ceil(sum(math.prod(s) for s in SHAPES) / 2)
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (partition_numel,)
        assert set(state[ROWS_KEY]) == {"sample_prev_grad", "sample_prev_weight"}
    assert torch.equal(states[0][LAYERS_KEY]["curvature"], states[1][LAYERS_KEY]["curvature"])


@register_curvature_estimator
class _UndeclaredStateSecant(SecantCurvature):
    """The secant, plus a state entry it does not declare."""

    name = "test_undeclared_state"
    state_schema: ClassVar[dict[str, StateKind]] = {"prev_grad": StateKind.ELEMENT}

    def finish(self, batch: LayerBatch, prelude: Prelude) -> None:
        super().finish(batch, prelude)
        for state in batch.states:
            state["undeclared"] = torch.zeros(())


def test_an_undeclared_state_entry_is_refused_by_name() -> None:
    with pytest.raises(RuntimeError, match=r"'undeclared'.*StateKind"):
        _partitioned_run_with("cblr", {"lr": 0.1, "curvature": "test_undeclared_state"})


def test_an_estimator_that_cannot_run_on_partitions_is_refused() -> None:
    with pytest.raises(NotImplementedError, match="secant_denoised"):
        _partitioned_run_with("cblr", {"lr": 0.1})


def _partitioned_run_with(name: str, kwargs: dict[str, Any]) -> None:
    """One rank of one: a single step on a partition that is the whole flat buffer."""
    total = sum(math.prod(shape) for shape in SHAPES)
    layers = _layers(torch.zeros(total))
    optimizer = _build(name, layers, FakeLayout(2, 0, 1, ThreadedSum(1).for_rank(0)), **kwargs)
    partition = _partition_of([layer.detach() for layer in layers], 2, 0, 1)
    optimizer.param_groups[0]["params"] = [partition]
    partition.grad = _partition_of(_grads(0), 2, 0, 1)
    optimizer.step()
