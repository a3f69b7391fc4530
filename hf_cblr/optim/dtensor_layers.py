r"""The DTensor layer source: exact layer-wise rates on PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) shards.
How shards map to layers, and what is supported: ``docs/sharding.md``.

FSDP2 replaces every parameter of a sharded module by a DTensor placed ``Shard(0)`` over its data-parallel mesh: rank
:math:`r` of :math:`N` holds rows :math:`[r R, \min((r + 1) R, n_0))` of a layer with :math:`n_0` rows,
:math:`R = \lceil n_0 / N \rceil` (``torch.chunk``; the last ranks may hold fewer rows, or none). A shard is therefore one
contiguous run of the flattened layer, a :class:`~hf_cblr.optim.types.LayerFragment`, and the step of one process runs
on the shards as it does on DeepSpeed ZeRO's fragments (:mod:`hf_cblr.optim.partitioned`): every rank steps the same
list of all layers, each as its local shard (``param.to_local()``, ``param.grad.to_local()``, flattened, possibly
empty), with local kernels: every per-layer sum the step needs (norms, inner products, MCLR's samples) is a partial
sum over the shards, and the batch's :class:`~hf_cblr.optim.types.LayerSums` sums all of them in one all-reduce of one
vector per param group and step, never DTensor's per-operator collectives. Then every
rank holds the rates of one process and updates its own shards. Layers placed ``Replicate()`` are whole on every rank
and stepped as one process steps them, in a batch of their own.

State lives with the shard: element-wise entries (momentum, Adam's moments, the previous gradient) are DTensors with
their parameter's placement, so memory per rank falls as :math:`1/N` and torch distributed checkpoint (DCP) saves each
rank's part and reshards it on load; per-layer scalars are plain 0-d tensors and per-layer rows (MCLR's samples) the
whole layer's row, the same on every rank (:attr:`~hf_cblr.optim.types.LayerBatch.whole_layer_rows`), which DCP saves
once and loads at any world size. Plain tensors for element state would be wrong there: DCP takes a tensor that is not
a DTensor as replicated and keeps one rank's copy.

Refused with a message naming what to use (:func:`check_dtensor_support`, :meth:`DTensorLayers.batches`): FSDP1's flat
parameters, placements other than ``Shard(0)`` and ``Replicate()`` or meshes of more than one dimension (tensor
parallel, HSDP), the closure estimators and those that hook the model's parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from hf_cblr.optim._tensor_ops import select_ops
from hf_cblr.optim.estimators import CurvatureEstimator
from hf_cblr.optim.param_groups import layer_names
from hf_cblr.optim.partitioned import ProcessGroupDistributor, reducing_ops
from hf_cblr.optim.types import LayerBatch, LayerFragment, LayerSums, StateKind, layer_batch

#: The attribute FSDP1 (``FullyShardedDataParallel``) sets on its flat parameters and on views of them
#: (``torch.distributed.fsdp._common_utils.FSDP_FLATTENED``).
FSDP1_FLATTENED = "_fsdp_flattened"
#: What the refusals offer instead.
SUPPORTED = ("PyTorch FSDP2 (torch.distributed.fsdp.fully_shard, parameters placed Shard(0) over a 1-D mesh; "
             "Accelerate: fsdp_version 2), DeepSpeed ZeRO-1/2/3, or DDP")


def check_dtensor_support(params: list[Tensor], estimator: CurvatureEstimator, optimizer_name: str) -> None:
    """Refuse parameters that no layer source of the package steps exactly, and an estimator that cannot run on
    DTensor shards: FSDP1's flattened parameters; DTensors on a mesh of more than one dimension or placed otherwise than
    ``Shard(0)`` or ``Replicate()``; with sharded DTensors, the closure estimators and those that hook the parameters."""
    if any(getattr(param, FSDP1_FLATTENED, False) for param in params):
        raise NotImplementedError(
            f"{optimizer_name} does not support FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel): its flat "
            "parameters concatenate layers, so the layer-wise rates cannot see them; use "
            f"{SUPPORTED}"
        )
    dtensors = [param for param in params if isinstance(param, DTensor)]
    for param in dtensors:
        if param.device_mesh.ndim != 1 or param.placements[0] not in (Shard(0), Replicate()):
            raise NotImplementedError(
                f"{optimizer_name} under DTensor supports parameters placed Shard(0) (FSDP2) or Replicate() over a 1-D "
                f"mesh, got placements {param.placements} over a {param.device_mesh.ndim}-D mesh (tensor parallel, HSDP "
                f"and other shardings cut layers in ways its per-layer sums do not follow); use {SUPPORTED}"
            )
    if any(param.placements[0] == Shard(0) for param in dtensors):
        if not estimator.supports_partitions:
            raise NotImplementedError(
                f"curvature={estimator.name!r} is not supported under FSDP2: it reads each backward pass's gradient of "
                "the model's parameters, which FSDP2 reduce-scatters into the shards; use curvature='secant' or "
                "'weight_norm' (MCLR: 'secant_elementwise')"
            )
        if estimator.needs_closure:
            raise NotImplementedError(
                f"curvature={estimator.name!r} is not supported under FSDP2: it perturbs the weights and re-evaluates the "
                "loss between backward passes of the sharded model; use curvature='secant' or 'weight_norm' "
                "(MCLR: 'secant_elementwise')"
            )


class DTensorLayers:
    """The DTensor layer source of a :class:`~hf_cblr.optim.cblr.CBLR` optimizer; every CBLR has one.

    :meth:`batches` returns None unless the param groups hold DTensors. Then it returns, per param group, one batch of
    its ``Shard(0)`` layers (local shards flattened, :class:`~hf_cblr.optim.types.LayerFragment` s, the step's sums
    summed over the mesh in one all-reduce through :attr:`distributor`) and one of its ``Replicate()``
    layers (whole, local kernels). The batches' state dicts hold the local tensors of the stored state;
    :meth:`store` puts what the step created or replaced back as DTensors (element state) or plain tensors.
    """

    def __init__(self) -> None:
        #: the all-reduce over the mesh of the sharded parameters (None before the first sharded step)
        self.distributor: ProcessGroupDistributor | None = None
        self._stepped: list[tuple[DTensor, dict[str, Any]]] = []

    def batches(self, param_groups: list[dict[str, Any]], state: dict[Tensor, dict[str, Any]], *,
                new_state: Callable[[Tensor], dict[str, Any]], schema: Mapping[str, StateKind], foreach: bool | None,
                rates_need_all_layers: bool, optimizer_name: str, estimator: CurvatureEstimator) -> list[LayerBatch] | None:
        """The step's batches, or None when no param group holds a DTensor.

        ``new_state(local)`` is a fresh layer state for a local tensor; ``schema`` the kind of every state entry
        (element state is stored as DTensors); every layer is in the step, so ``rates_need_all_layers`` holds as in
        one process. Refuses what :func:`check_dtensor_support` refuses, and DTensors mixed with plain tensors or
        over several meshes.
        """
        params = [param for group in param_groups for param in group["params"]]
        check_dtensor_support(params, estimator, optimizer_name)
        dtensors = [param for param in params if isinstance(param, DTensor)]
        if not dtensors:
            return None
        if len(dtensors) != len(params):
            raise RuntimeError(
                f"{optimizer_name}: some parameters are DTensors and others plain tensors; shard every parameter the "
                "optimizer steps (fully_shard the root module too) or none"
            )
        meshes = {param.device_mesh for param in dtensors}
        if len(meshes) != 1:
            raise NotImplementedError(f"{optimizer_name}: the parameters are DTensors over {len(meshes)} device meshes; "
                                      "FSDP2 with one data-parallel mesh is supported")
        mesh = meshes.pop()
        if self.distributor is None or self.distributor.group is not mesh.get_group():
            self.distributor = ProcessGroupDistributor(mesh.get_group())
        self._stepped = []
        batches, first_layer_id = [], 0
        for group_index, group in enumerate(param_groups):
            names = layer_names(group, group_index)
            members = [(j, p) for j, p in enumerate(group["params"]) if p.grad is not None]
            for sharded in (True, False):
                layers = [(j, p) for j, p in members if (p.placements[0] == Shard(0)) == sharded]
                if layers:
                    batches.append(self._batch(group, layers, names, first_layer_id, state, new_state, foreach, sharded))
            first_layer_id += len(group["params"])
        return batches

    def _batch(self, group: dict[str, Any], layers: list[tuple[int, DTensor]], names: list[str], first_layer_id: int,
               state: dict[Tensor, dict[str, Any]], new_state: Callable[[Tensor], dict[str, Any]], foreach: bool | None,
               sharded: bool) -> LayerBatch:
        """One batch of ``layers`` (positions in ``group`` and parameters): flattened shards, or whole replicated layers."""
        locals_, grads, states, fragments = [], [], [], []
        for j, param in layers:
            local = param.to_local()
            grad = param.grad.to_local()
            if sharded:
                _, global_offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
                local, grad = local.view(-1), grad.reshape(-1)
                fragments.append(LayerFragment(j, tuple(param.shape), 0, global_offset[0] * math.prod(param.shape[1:]),
                                               local.numel()))
            layer_state = {key: value.to_local().view(local.shape) if isinstance(value, DTensor) else value
                           for key, value in state[param].items()} if state[param] else new_state(local)
            self._stepped.append((param, layer_state))
            locals_.append(local)
            grads.append(grad)
            states.append(layer_state)
        assert self.distributor is not None
        ops = select_ops(foreach, locals_, fused=False)  # the fused kernels are not wired to shards
        return layer_batch(
            group, locals_, grads, states, names=[names[j] for j, _ in layers],
            layer_ids=[first_layer_id + j for j, _ in layers], ndims=[param.ndim for _, param in layers],
            ops=reducing_ops(ops, self.distributor) if sharded else ops,
            sums=LayerSums(ops, self.distributor.all_reduce_sum) if sharded else None,
            fragments=fragments if sharded else None, whole_layer_rows=sharded,
        )

    def store(self, state: dict[Tensor, dict[str, Any]], schema: Mapping[str, StateKind]) -> None:
        """After the step: element state back into DTensors placed as their parameter, the rest as it is."""
        for param, layer_state in self._stepped:
            local_shape = param.to_local().shape
            stored = {}
            for key, value in layer_state.items():
                kind = schema.get(key)
                if kind is None:
                    raise RuntimeError(f"optimizer state {key!r} is not declared in the optimizer's state schema: declare "
                                       "it StateKind.LAYER, ELEMENT or ROW to keep it with a DTensor parameter")
                if kind is StateKind.ELEMENT:
                    value = DTensor.from_local(value.view(local_shape), param.device_mesh, param.placements,
                                               run_check=False, shape=param.shape, stride=param.stride())
                stored[key] = value
            state[param] = stored
        self._stepped = []
