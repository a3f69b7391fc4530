r"""The flat-partition layer source: exact layer-wise rates on DeepSpeed ZeRO's flat partitions (stages 1, 2, 3 and
the BF16 optimizer). How and why, with the figures: ``docs/zero.md``.

In short: ZeRO gives each rank a contiguous slice of a flattened param group, so a layer may be cut across ranks.
Every rank builds the same list of *all* layers of the partition it steps, each with the :class:`LayerFragment` of it
in the local slice (possibly empty), and steps them with local kernels; the per-layer sums the step needs (norms, inner
products, MCLR's samples) are partial sums over the fragments, which the batch's
:class:`~hf_cblr.optim.types.LayerSums` sums over the ranks in one ``all_reduce`` per partition and step, so every rank
computes the rates of one process and applies them to its own fragments. State lives with the partition, by the kind
each entry declares (:class:`~hf_cblr.optim.types.StateKind`): element state as one flat tensor shaped like the
partition, per-layer scalars as ``[num_layers]`` vectors under ``state["layers"]``, per-layer rows under ``state["layer_rows"]``.

Where the layers lie is a :class:`PartitionLayout`: :class:`DeepSpeedLayout` reads the attributes DeepSpeed sets on
the parameters (``_hp_mapping``, ``_dp_group``; stage 3: ``ds_id``, ``ds_shape``, ``ds_numel``,
``ds_process_group``, ``partition_numel()``), without importing DeepSpeed; another sharding engine, or a test's fake,
passes its own as the optimizer's ``partition_layout``. Refused on partitions (:func:`check_zero_support`): the
closure estimators and those that hook the model's parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor

from hf_cblr.optim._tensor_ops import ForeachTensorListOps, FusedTensorListOps, TensorListOps, select_ops
from hf_cblr.optim.estimators import CurvatureEstimator
from hf_cblr.optim.param_groups import layer_names
from hf_cblr.optim.types import LayerBatch, LayerFragment, LayerSums, StateKind, layer_batch

#: ``state[partition]["layers"]``: the per-layer scalars of a flat partition, one ``[num_layers]`` vector each.
LAYERS_KEY = "layers"
#: ``state[partition]["layer_rows"][key]``: per-layer rows of any length, ``{"values": the rows concatenated,
#: "lengths": [num_layers]}``.
ROWS_KEY = "layer_rows"


# -- distributors ------------------------------------------------------------------------------
class Distributor(Protocol):
    """Sums a tensor over the ranks that share a flat partition's param group."""

    def all_reduce_sum(self, tensor: Tensor) -> Tensor: ...


class ProcessGroupDistributor:
    """``torch.distributed.all_reduce`` over ``group`` (DeepSpeed's data-parallel group of the params)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        #: all-reduces issued so far
        self.calls = 0

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        self.calls += 1
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor


class _ReducingOps(TensorListOps):
    """Per-layer norms and inner products of whole layers from this rank's fragments, one all-reduce per call: for a
    part of the step that calls ``ops.norms`` or ``ops.dot`` instead of taking its sums through the batch's
    :class:`~hf_cblr.optim.types.LayerSums` (which every part shipped with the package does)."""

    def __init__(self, distributor: Distributor) -> None:
        self.distributor = distributor

    def norms(self, xs: Sequence[Tensor]) -> Tensor:
        if not xs:
            return super().norms(xs)
        return self.distributor.all_reduce_sum(super().norms(xs).square()).sqrt()

    def dot(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
        if not xs:
            return super().dot(xs, ys)
        return self.distributor.all_reduce_sum(super().dot(xs, ys))

    def all_reduce_sum(self, vector: Tensor) -> Tensor:
        return self.distributor.all_reduce_sum(vector)


class ReducingTensorListOps(_ReducingOps, TensorListOps):
    """The single-tensor kernels; ``norms`` and ``dot`` summed over the ranks (one all-reduce per call)."""


class ReducingForeachTensorListOps(_ReducingOps, ForeachTensorListOps):
    """The foreach kernels; ``norms`` and ``dot`` summed over the ranks (one all-reduce per call)."""


class ReducingFusedTensorListOps(_ReducingOps, FusedTensorListOps):
    """The fused kernels on the rank's fragments (their sums of squares are partial, taken through the batch's
    :class:`~hf_cblr.optim.types.LayerSums` into the step's one all-reduce); ``norms`` and ``dot`` summed over the
    ranks (one all-reduce per call)."""


def reducing_ops(local: TensorListOps, distributor: Distributor) -> TensorListOps:
    """``local``'s kernels, with norms and inner products summed over ``distributor``'s ranks."""
    if isinstance(local, FusedTensorListOps):
        return ReducingFusedTensorListOps(distributor)
    if isinstance(local, ForeachTensorListOps):
        return ReducingForeachTensorListOps(distributor)
    return ReducingTensorListOps(distributor)


# -- fragments ---------------------------------------------------------------------------------
def zero12_fragments(params: Sequence[Tensor], indices: Sequence[int], partition_start: int,
                     partition_numel: int) -> list[LayerFragment]:
    """Fragments of a stage 1/2 or BF16-optimizer partition.

    The parameters of a group are views of one flat buffer (``stage_1_and_2.py:
    _update_model_bit16_weights``, ``bf16_optimizer.py: _update_storage_to_flattened_tensor``), so
    a parameter's storage offset is its offset in the buffer, and the partition is elements
    ``[partition_start, partition_start + partition_numel)`` of it. (DeepSpeed's own ``_hp_mapping``
    assumes the group's order and is wrong when ``round_robin_gradients`` reorders the buffer.)
    """
    if len({param.untyped_storage().data_ptr() for param in params}) != 1:
        raise RuntimeError("the parameters of a ZeRO param group are not views of one flat buffer: unknown layout")
    partition_end = partition_start + partition_numel
    fragments = []
    for param, index in zip(params, indices, strict=True):
        offset = param.storage_offset()
        start, end = max(offset, partition_start), min(offset + param.numel(), partition_end)
        if start < end:
            fragments.append(LayerFragment(index, tuple(param.shape), start - partition_start, start - offset, end - start))
        else:
            fragments.append(LayerFragment(index, tuple(param.shape), 0, 0, 0))
    return fragments


def zero3_fragments(params: Sequence[Any], indices: Sequence[int], rank: int) -> list[LayerFragment]:
    """Fragments of a stage-3 sub-group partition: each parameter's ``ds_tensor`` slice, concatenated.

    Rank ``r`` holds elements ``[r P, (r + 1) P)`` of a parameter, ``P = ceil(numel / N)``, the
    last rank padded (``partition_parameters.py: _partition_param``); the sub-group partition is the
    concatenation of those slices in sub-group order (``stage3.py: set_grad_positions``). The
    padding is in no fragment. Reads ``partition_numel()``, ``ds_numel`` and ``ds_shape`` of each parameter.
    """
    fragments, offset = [], 0
    for param, index in zip(params, indices, strict=True):
        partition_numel = param.partition_numel()
        start = rank * partition_numel
        length = max(0, min(partition_numel, param.ds_numel - start))
        fragments.append(LayerFragment(index, tuple(param.ds_shape), offset, min(start, param.ds_numel), length))
        offset += partition_numel
    return fragments


# -- layouts: where a sharding engine puts the layers -------------------------------------------
@runtime_checkable
class PartitionLayout(Protocol):
    """How a sharding engine lays a param group's layers out in flat partitions (DeepSpeed's, or a fake in tests)."""

    def holds_partition(self, params: list[Tensor], layers: list[Tensor]) -> bool:
        """Whether a param group now holding ``params`` holds a flat partition of ``layers`` (its original params)."""
        ...

    def fragments(self, flat: Tensor, layers: list[Tensor]) -> tuple[list[LayerFragment], Distributor]:
        """The fragments of ``layers`` (given with their positions in the group) that lie in ``flat``, and the
        distributor over the ranks that share it."""
        ...


class DeepSpeedLayout:
    """DeepSpeed ZeRO-1/2 and BF16-optimizer partitions (:func:`zero12_fragments`) and ZeRO-3 sub-group partitions
    (:func:`zero3_fragments`), read from the attributes DeepSpeed sets on the parameters."""

    def holds_partition(self, params: list[Tensor], layers: list[Tensor]) -> bool:
        """ZeRO replaced the group's parameters by one flat partition (and linked the originals to it)."""
        if len(params) != 1 or (layers and params[0] is layers[0]):
            return False
        if isinstance(getattr(params[0], "ds_id", None), str):
            return True  # stage 3: the fp32 sub-group partition, ds_id "<first ds_id>_<last ds_id>"
        trainable = [p for p in layers if p.requires_grad and p.numel() > 0]
        return bool(trainable) and all(hasattr(p, "_hp_mapping") for p in trainable)

    def fragments(self, flat: Tensor, layers: list[Tensor]) -> tuple[list[LayerFragment], Distributor]:
        trainable = [(j, p) for j, p in enumerate(layers) if p.requires_grad]
        ds_id = getattr(flat, "ds_id", None)
        if isinstance(ds_id, str):
            first, last = (int(part) for part in ds_id.split("_"))
            ids = [p.ds_id for _, p in trainable]
            members = [(j, p) for j, p in trainable[ids.index(first): ids.index(last) + 1] if p.ds_numel > 0]
            group = members[0][1].ds_process_group
            fragments = zero3_fragments([p for _, p in members], [j for j, _ in members], dist.get_rank(group=group))
        else:
            members = [(j, p) for j, p in trainable if p.numel() > 0]
            group = members[0][1]._dp_group
            rank = dist.get_rank(group=group)
            fragments = zero12_fragments([p for _, p in members], [j for j, _ in members], rank * flat.numel(), flat.numel())
        return fragments, ProcessGroupDistributor(group)


# -- the layers behind the partitions ----------------------------------------------------------
@dataclass
class _GroupRecord:
    """A param group as it was given to the optimizer, before ZeRO replaced its parameters."""

    params: list[Tensor]
    names: list[str]
    first_layer_id: int
    #: ids of the trainable layers in the group's adaptation mask
    adapted: frozenset[int]


@dataclass
class Partition:
    """The layers of one flat partition and the per-layer views of its state."""

    flat: Tensor
    record: _GroupRecord
    fragments: list[LayerFragment]
    distributor: Distributor
    layer_states: list[dict[str, Any]] = field(default_factory=list)
    #: key -> the stored object the views of ``layer_states[*][key]`` were cut from
    bases: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [self.record.names[f.index] for f in self.fragments]

    def local(self, tensor: Tensor) -> list[Tensor]:
        """The fragments of ``tensor`` (shaped like the partition), one 1-D view per layer."""
        return [tensor.narrow(0, f.offset, f.length) for f in self.fragments]


class PartitionedLayers:
    """The flat-partition layer source of a :class:`~hf_cblr.optim.cblr.CBLR` optimizer; every CBLR has one.

    It records each param group as it is added (ZeRO later replaces the group's parameters by one
    flat partition). While the groups hold their own parameters, :meth:`batches` returns None and
    the optimizer steps its layers as they are. While they hold partitions (``layout`` says which),
    it builds the step's batches (one per visible partition: all its layers, their local fragments, norms
    reduced over the ranks) and :meth:`store` keeps their state in the partition, by the kind each state
    entry declares (:class:`~hf_cblr.optim.types.StateKind`). DeepSpeed calls ``step``
    once per param group under ZeRO-1/2 (``stage_1_and_2.py: _optimizer_step``), once per sub-group
    under ZeRO-3 (``stage3.py: _optimizer_step``) and once for all groups with the BF16 optimizer. ``fused``: the
    optimizer's setting, as on whole layers (:func:`~hf_cblr.optim._tensor_ops.select_ops`): the fused kernels' partial
    sums on the fragments go into the step's one all-reduce as the foreach kernels' do.
    """

    def __init__(self, layout: PartitionLayout | None = None, fused: bool | None = None) -> None:
        self.layout = DeepSpeedLayout() if layout is None else layout
        self.fused = fused
        self._records: dict[int, _GroupRecord] = {}
        self._partitions: dict[int, Partition] = {}
        self._stepped: list[Partition] = []

    def record(self, group: dict[str, Any], index: int, adapted: Sequence[bool]) -> None:
        """Remember ``group`` (the optimizer's ``index``-th), as given to the optimizer; ``adapted``: which of
        its parameters are in its adaptation mask."""
        names = layer_names(group, index)
        first_layer_id = sum(len(record.params) for record in self._records.values())
        adapted_ids = frozenset(first_layer_id + j for j, (param, adapt) in enumerate(zip(group["params"], adapted, strict=True))
                                if adapt and param.requires_grad)
        self._records[id(group)] = _GroupRecord(list(group["params"]), list(names), first_layer_id, adapted_ids)

    def follow(self, previous: list[dict[str, Any]], groups: list[dict[str, Any]]) -> None:
        """``torch.optim.Optimizer.load_state_dict`` replaced the group dicts: the records follow by position."""
        self._records = {id(new): self._records[id(old)] for old, new in zip(previous, groups, strict=True)}
        self._partitions.clear()

    def layers_of(self, group: dict[str, Any]) -> list[Tensor]:
        """The layers of ``group`` as they were given to the optimizer (under ZeRO the group holds a partition)."""
        return self._records[id(group)].params

    def names_of(self, group: dict[str, Any]) -> list[str]:
        """The names of the layers of ``group`` (:func:`~hf_cblr.optim.param_groups.layer_names` when it was added)."""
        return self._records[id(group)].names

    def partitions(self) -> list[Partition]:
        """The partitions stepped so far."""
        return list(self._partitions.values())

    def batches(self, param_groups: list[dict[str, Any]], state: dict[Tensor, dict[str, Any]], *,
                new_state: Callable[[Tensor], dict[str, Any]], schema: Mapping[str, StateKind], foreach: bool | None,
                rates_need_all_layers: bool, optimizer_name: str, estimator: CurvatureEstimator) -> list[LayerBatch] | None:
        """The step's batches, or None when no param group holds a partition (the optimizer's own layers).

        ``state`` is the optimizer's (partitions keep theirs under the flat tensor); ``new_state(fragment)`` is a
        fresh layer state; ``schema`` the kind of every state entry; with ``rates_need_all_layers`` a step over
        some but not all adapted layers is refused (``optimizer_name`` says whose); an ``estimator`` that cannot run
        on partitions is refused (:func:`check_zero_support`).
        """
        groups = [group for group in param_groups if group["params"]]
        partitioned = [self.layout.holds_partition(group["params"], self._records[id(group)].params) for group in groups]
        if not any(partitioned):
            return None
        if not all(partitioned):
            raise RuntimeError("some param groups hold ZeRO partitions and others do not: not a known layout")
        check_zero_support(estimator)
        self._stepped = []
        batches = []
        for group in groups:
            flat = group["params"][0]
            if flat.grad is None:
                continue
            partition = self._partition(flat, self._records[id(group)], state, new_state, schema)
            self._stepped.append(partition)
            local_ops = select_ops(foreach, [flat], self.fused)
            batches.append(layer_batch(
                group, partition.local(flat), partition.local(flat.grad), partition.layer_states,
                names=partition.names,
                layer_ids=[partition.record.first_layer_id + f.index for f in partition.fragments],
                ndims=[len(f.shape) for f in partition.fragments],
                ops=reducing_ops(local_ops, partition.distributor),
                sums=LayerSums(local_ops, partition.distributor.all_reduce_sum),
                fragments=partition.fragments,
            ))
        if rates_need_all_layers:
            self._check_all_adapted_layers(optimizer_name, batches)
        return batches

    def store(self, state: dict[Tensor, dict[str, Any]], schema: Mapping[str, StateKind]) -> None:
        """After the step: keep what it created or replaced per layer in the partitions' storage."""
        for partition in self._stepped:
            _store_layer_states(state[partition.flat], partition, schema)
        self._stepped = []

    def _check_all_adapted_layers(self, optimizer_name: str, batches: list[LayerBatch]) -> None:
        """Refuse a step over some but not all adapted layers: MCLR's median over them would see only those.

        DeepSpeed calls ``step`` per param group (ZeRO-1/2) or per sub-group (ZeRO-3). A call whose
        layers include no adapted one does not use the median; one that includes all of them is exact.
        """
        stepped = {layer_id for batch in batches for layer_id, adapt in zip(batch.layer_ids, batch.adapt.tolist(), strict=True)
                   if adapt}
        adapted = frozenset().union(*(record.adapted for record in self._records.values()))
        if stepped and stepped != adapted:
            raise NotImplementedError(
                f"{optimizer_name} normalizes its layer rates by the median curvature over all {len(adapted)} "
                f"adapted layers, but DeepSpeed steps {len(stepped)} of them in this optimizer.step() call (ZeRO-3 steps "
                "each sub-group on its own): raise zero_optimization.sub_group_size to at least the number of parameters "
                "of the param group that holds the adapted layers (DeepSpeed's default, 1e9, does), and keep the adapted layers "
                "in one param group (ZeRO-1/2 step each param group on its own)"
            )

    def _partition(self, flat: Tensor, record: _GroupRecord, state: dict[Tensor, dict[str, Any]],
                   new_state: Callable[[Tensor], dict[str, Any]], schema: Mapping[str, StateKind]) -> Partition:
        partition = self._partitions.get(id(flat))
        if partition is None or partition.flat is not flat:
            partition = Partition(flat, record, *self.layout.fragments(flat, record.params))
            end = max(f.offset + f.length for f in partition.fragments)
            if end > flat.numel():
                raise RuntimeError(f"the layers' fragments end at element {end}, past the partition's {flat.numel()}")
            self._partitions[id(flat)] = partition
        stored = state[flat]
        if not stored:
            partition.layer_states = [new_state(fragment) for fragment in partition.local(flat)]
            state[flat] = {LAYERS_KEY: {}}
            _store_layer_states(state[flat], partition, schema)
        elif not partition.bases or any(stored.get(key) is not base for key, base in partition.bases.items()):
            _attach_layer_states(stored, partition)  # a checkpoint was loaded, or DeepSpeed replaced the state
        return partition


# -- state in the partition --------------------------------------------------------------------
def _attach_layer_states(stored: dict[str, Any], partition: Partition) -> None:
    """Per-layer views of a partition's stored state; refuses state saved for another partitioning."""
    layers = stored[LAYERS_KEY]
    num_layers = len(partition.fragments)
    partition.layer_states = [{} for _ in partition.fragments]
    for key, vector in list(layers.items()):
        if vector.shape != (num_layers,):
            raise RuntimeError(
                f"the optimizer state {LAYERS_KEY}[{key!r}] holds {vector.numel()} layers, this partition has "
                f"{num_layers}: the checkpoint was saved with another param grouping or ZeRO sub-grouping"
            )
        layers[key] = vector.to(partition.flat.device)
        for state, value in zip(partition.layer_states, layers[key].unbind(), strict=True):
            state[key] = value
    for key, rows in stored.get(ROWS_KEY, {}).items():
        # torch's load_state_dict casts nested tensors to the partition's dtype: the lengths come back as floats
        rows["lengths"] = rows["lengths"].to(device="cpu", dtype=torch.int64)
        if rows["lengths"].shape != (num_layers,):
            raise RuntimeError(
                f"the optimizer state {ROWS_KEY}[{key!r}] holds {rows['lengths'].numel()} layers, this partition has "
                f"{num_layers}: the checkpoint was saved with another param grouping or ZeRO sub-grouping"
            )
        rows["values"] = rows["values"].to(partition.flat.device)
        for state, view in zip(partition.layer_states, rows["values"].split(rows["lengths"].tolist()), strict=True):
            state[key] = view
    for key, value in stored.items():
        if key in (LAYERS_KEY, ROWS_KEY):
            continue
        if not isinstance(value, Tensor) or value.shape != partition.flat.shape:
            raise RuntimeError(
                f"the optimizer state {key!r} has shape {tuple(getattr(value, 'shape', ()))}, the partition "
                f"{tuple(partition.flat.shape)}: the checkpoint was saved with another ZeRO world size or "
                "partitioning (DeepSpeed re-partitions optimizer state only through universal checkpoints)"
            )
        for state, view in zip(partition.layer_states, partition.local(value), strict=True):
            state[key] = view
    partition.bases = dict(stored)


def _store_layer_states(stored: dict[str, Any], partition: Partition, schema: Mapping[str, StateKind]) -> None:
    """Move state the last step created or replaced per layer into the partition's storage, by its declared kind.

    A :attr:`~StateKind.LAYER` scalar goes to ``stored["layers"][key]``, an :attr:`~StateKind.ELEMENT` tensor (one
    value per element of the fragment) to a flat tensor shaped like the partition, a :attr:`~StateKind.ROW` into
    ``stored["layer_rows"][key]``; the layer dicts then hold views of the storage.
    """
    layers = stored[LAYERS_KEY]
    for key in dict.fromkeys(key for state in partition.layer_states for key in state):
        values = [state.get(key) for state in partition.layer_states]
        if any(value is None for value in values):
            raise RuntimeError(f"optimizer state {key!r} exists for some layers of a partition only")
        kind = schema.get(key)
        if kind is StateKind.ROW:
            rows = stored.setdefault(ROWS_KEY, {})
            lengths = [value.numel() for value in values]
            if key not in rows or rows[key]["lengths"].tolist() != lengths:
                rows[key] = {"values": torch.cat([value.reshape(-1) for value in values]),
                             "lengths": torch.tensor(lengths, dtype=torch.int64)}
            views = list(rows[key]["values"].split(lengths))
        elif kind is StateKind.LAYER and all(value.ndim == 0 for value in values):
            if key not in layers:
                layers[key] = torch.stack(values).to(torch.float32)
            views = list(layers[key].unbind())
        elif kind is StateKind.ELEMENT and all(value.numel() == fragment.length
                                               for value, fragment in zip(values, partition.fragments, strict=True)):
            if key not in stored:
                stored[key] = torch.zeros_like(partition.flat, dtype=values[0].dtype)
            views = partition.local(stored[key])
        else:
            raise RuntimeError(
                f"optimizer state {key!r} is declared {kind} in the optimizer's state schema but holds tensors of shapes "
                f"{sorted({tuple(value.shape) for value in values})}: declare every state entry as StateKind.LAYER (a "
                "0-d tensor per layer), ELEMENT (one value per element) or ROW (a 1-D row per layer) to keep it in a "
                "ZeRO partition"
            )
        for state, value, view in zip(partition.layer_states, values, views, strict=True):
            if value is not view:
                view.copy_(value.reshape(view.shape))
                state[key] = view
    partition.bases = dict(stored)


def check_zero_support(estimator: CurvatureEstimator) -> None:
    """Raise ``NotImplementedError`` for an estimator that cannot run on ZeRO partitions, saying what to use."""
    if not estimator.supports_partitions:
        raise NotImplementedError(
            f"curvature={estimator.name!r} is not supported under DeepSpeed ZeRO: it reads each backward pass's gradient "
            "of the model's parameters, which ZeRO reduces into its own partitions; use curvature='secant' or 'weight_norm'"
        )
    if estimator.needs_closure:
        raise NotImplementedError(
            f"curvature={estimator.name!r} is not supported under DeepSpeed ZeRO: it needs optimizer.step(closure) and "
            "DeepSpeed calls step() without a closure; use curvature='secant' or 'weight_norm' (MCLR: 'secant_elementwise')"
        )
