"""Trains a tiny MLP under FSDP2 (``fully_shard``) with every optimizer case, for ``tests/test_fsdp2.py``.

``torchrun --nproc_per_node N fsdp2_worker.py OUTPUT``: each case runs :data:`STEPS` steps on the shards (every rank its
slice of the batch) and again with a save through torch distributed checkpoint (DCP) at step :data:`SAVE_AT` and a resume
in a new model and optimizer, once with the optimizer's own state dict and once through torch's state-dict helpers
(``get_state_dict``/``set_state_dict``); rank 0 writes ``OUTPUT/<case>.pt`` with the full parameters, the layer
statistics, the all-reduces per step, each rank's optimizer state bytes and the parameters of both resumed runs.
``fsdp2_worker.py OUTPUT resize`` resumes the checkpoints found in ``OUTPUT`` (saved at another world size) into
``OUTPUT/resized-<case>.pt``. The first dimensions of the layers (37, 9, 1) do not divide by 2 ranks, and the last is
smaller than the world size: rank 1 holds no row of it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import hf_cblr

STEPS = 10
SAVE_AT = 5
BATCH = 8
#: name -> (registry optimizer, its arguments); CBLR's absolute rule (MCLR's cases take the median rule)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"{name}-{curvature}": (name, {"lr": lr, "curvature": curvature, "rate_rule": "inverse_curvature", "weight_decay": 0.01,
                                      "sample_size": 50})
       for name, lr in (("cblr", 0.05), ("cblr_adam", 0.01)) for curvature in ("secant", "weight_norm", "secant_elementwise")},
    # MCLR: secant_elementwise, median (hutchinson needs a closure); samples of 50 elements, or whole layers
    **{f"{name}-secant_elementwise-{size or 'all'}": (name, {"lr": lr, "weight_decay": 0.01, "sample_size": size})
       for name, lr in (("mclr", 0.05), ("mclr_adam", 0.01)) for size in (50, None)},
    "lars": ("lars", {"lr": 0.5, "weight_decay": 0.01}),
    "lamb": ("lamb", {"lr": 0.01, "weight_decay": 0.01}),
}


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 37), nn.Tanh(), nn.Linear(37, 9), nn.Tanh(), nn.Linear(9, 1))


def batch(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(BATCH, 6, generator=generator)
    return inputs, inputs[:, :1].sin() + 0.1 * torch.randn(BATCH, 1, generator=generator)


def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.mse_loss(outputs, targets)


def state_bytes(state: dict[Any, dict[str, Any]]) -> int:
    """Bytes of the optimizer state held by this rank (a DTensor's local shard only)."""
    total = 0
    for layer_state in state.values():
        for value in layer_state.values():
            if isinstance(value, DTensor):
                value = value.to_local()
            if isinstance(value, Tensor):
                total += value.numel() * value.element_size()
    return total


def sharded(mesh: DeviceMesh) -> nn.Sequential:
    model = build_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    share = BATCH // world
    for step in steps:
        inputs, targets = batch(step)
        optimizer.zero_grad()
        loss_fn(model(inputs[rank * share:(rank + 1) * share]), targets[rank * share:(rank + 1) * share]).backward()
        optimizer.step()


def full_parameters(model: nn.Module) -> dict[str, Tensor]:
    return {name: param.full_tensor().detach().clone() for name, param in model.named_parameters()}


def run_case(mesh: DeviceMesh, case: str, checkpoint: Path) -> dict[str, Any]:
    name, kwargs = CASES[case]
    model = sharded(mesh)
    optimizer = hf_cblr.create_optimizer(model, name, **kwargs)
    train(model, optimizer, range(STEPS))
    distributor = optimizer.dtensor_layers.distributor
    per_rank: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(per_rank, state_bytes(optimizer.state))
    result = {"parameters": full_parameters(model), "layer_stats": optimizer.layer_stats(),
              "reductions_per_step": distributor.calls / STEPS, "param_groups": len(optimizer.param_groups),
              "state_bytes_per_rank": per_rank}

    model = sharded(mesh)
    optimizer = hf_cblr.create_optimizer(model, name, **kwargs)
    train(model, optimizer, range(SAVE_AT))
    dcp.save({"model": get_model_state_dict(model), "optimizer": optimizer.state_dict()}, checkpoint_id=checkpoint / case)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint / f"{case}-helpers")
    result["resumed"] = resume(mesh, case, checkpoint)
    result["resumed_through_helpers"] = resume_through_helpers(mesh, case, checkpoint)
    return result


def resume_through_helpers(mesh: DeviceMesh, case: str, checkpoint: Path) -> dict[str, Tensor]:
    """As :func:`resume`, through torch's ``get_state_dict``/``set_state_dict`` (state keyed by parameter name; the
    helpers create the optimizer's state to load into by a step with zero gradients and learning rate)."""
    name, kwargs = CASES[case]
    model = sharded(mesh)
    optimizer = hf_cblr.create_optimizer(model, name, **kwargs)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=checkpoint / f"{case}-helpers")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    train(model, optimizer, range(SAVE_AT, STEPS))
    return full_parameters(model)


def resume(mesh: DeviceMesh, case: str, checkpoint: Path) -> dict[str, Tensor]:
    """The parameters after loading ``case``'s checkpoint of step :data:`SAVE_AT` and training to :data:`STEPS`."""
    name, kwargs = CASES[case]
    model = sharded(mesh)
    optimizer = hf_cblr.create_optimizer(model, name, **kwargs)
    train(model, optimizer, range(1))  # the state to load into: DCP loads into the tensors of a state dict
    state = {"model": get_model_state_dict(model), "optimizer": optimizer.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint / case)
    set_model_state_dict(model, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    train(model, optimizer, range(SAVE_AT, STEPS))
    return full_parameters(model)


def main() -> None:
    output, resized = Path(sys.argv[1]), sys.argv[2:] == ["resize"]
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for case in CASES:
        if resized:  # the checkpoints another world size saved
            result = {"resumed": resume(mesh, case, output / "checkpoints")}
        else:
            result = run_case(mesh, case, output / "checkpoints")
        if dist.get_rank() == 0:
            torch.save(result, output / f"{'resized-' if resized else ''}{case}.pt")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
