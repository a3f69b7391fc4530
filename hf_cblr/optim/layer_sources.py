"""Layer sources: where a step's layers come from, behind one interface (as Distributed Shampoo's distributors).

A source turns the optimizer's param groups into :class:`~hf_cblr.optim.types.LayerBatch` es (``batches``; None when
the groups are not its kind) and keeps the state the step created (``store``). :class:`LocalLayers`: the groups' own
parameters are the layers. :class:`~hf_cblr.optim.partitioned.PartitionedLayers`: the groups hold flat partitions
(DeepSpeed ZeRO) of layers it recorded when they were added. The optimizer asks the partitioned source first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from torch import Tensor

from hf_cblr.optim._tensor_ops import select_ops
from hf_cblr.optim.estimators import CurvatureEstimator
from hf_cblr.optim.param_groups import layer_names, layer_ndim
from hf_cblr.optim.types import LayerBatch, StateKind, layer_batch


class LayerSource(Protocol):
    """The step's batches of layers from the optimizer's param groups, and their state stored back."""

    def batches(self, param_groups: list[dict[str, Any]], state: dict[Tensor, dict[str, Any]], *,
                new_state: Callable[[Tensor], dict[str, Any]], schema: Mapping[str, StateKind], foreach: bool | None,
                rates_need_all_layers: bool, optimizer_name: str,
                estimator: CurvatureEstimator) -> list[LayerBatch] | None:
        """One batch per param group with gradients (None: the groups are not this source's); ``new_state(layer)``
        is a fresh layer state, ``schema`` the kind of each state entry, the rest what the source checks."""
        ...

    def store(self, state: dict[Tensor, dict[str, Any]], schema: Mapping[str, StateKind]) -> None:
        """After the step: keep the state it created or replaced."""
        ...


class LocalLayers:
    """The param groups' own parameters (those with a gradient) are the layers; their state is the optimizer's.
    Whole layers, so the fused kernels may run on them (``fused``: the optimizer's setting, :func:`select_ops`)."""

    def __init__(self, fused: bool | None = None) -> None:
        self.fused = fused

    def batches(self, param_groups: list[dict[str, Any]], state: dict[Tensor, dict[str, Any]], *,
                new_state: Callable[[Tensor], dict[str, Any]], schema: Mapping[str, StateKind], foreach: bool | None,
                rates_need_all_layers: bool, optimizer_name: str, estimator: CurvatureEstimator) -> list[LayerBatch]:
        batches, first_layer_id = [], 0
        for group_index, group in enumerate(param_groups):
            names = layer_names(group, group_index)
            members = [(j, p) for j, p in enumerate(group["params"]) if p.grad is not None]
            for _, param in members:
                if param.grad.is_sparse:
                    raise RuntimeError(f"{optimizer_name} does not support sparse gradients")
                if not state[param]:
                    state[param] = new_state(param)
            if members:
                params = [p for _, p in members]
                batches.append(layer_batch(
                    group, params, [p.grad for p in params], [state[p] for p in params],
                    names=[names[j] for j, _ in members], layer_ids=[first_layer_id + j for j, _ in members],
                    ndims=[layer_ndim(p) for p in params], ops=select_ops(foreach, params, self.fused),
                ))
            first_layer_id += len(group["params"])
        return batches

    def store(self, state: dict[Tensor, dict[str, Any]], schema: Mapping[str, StateKind]) -> None:
        """The layers' state dicts are the optimizer's own: nothing to move."""
