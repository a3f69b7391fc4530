"""torchrun worker: train a small MLP with our optimizers under DeepSpeed ZeRO and save what came out.

``python -m torch.distributed.run --standalone --nproc_per_node N ds_zero_worker.py OUTPUT_DIR STAGE[+OPTION...] [SAVE_AT]``

``... ds_zero_worker.py OUTPUT_DIR STAGE resize-save`` saves a checkpoint of the ``lars`` case after 3 steps;
``... ds_zero_worker.py OUTPUT_DIR STAGE resize-load`` (with another number of ranks) tries to resume it and
writes the error to ``OUTPUT_DIR/resize-error.txt``. ``... ds_zero_worker.py OUTPUT_DIR 3 sub-groups`` steps MCLR under
ZeRO-3 with its adapted layers in several sub-groups and writes the error to ``OUTPUT_DIR/sub-groups-error.txt``.

For every entry of :data:`CASES` it trains :data:`STEPS` steps on the batches of :func:`batch`, each
rank on its half of the global batch (options: ``offload``, the optimizer state offloaded to the
CPU; ``round_robin``, ``round_robin_gradients``), and rank 0 writes ``OUTPUT_DIR/<case>.pt``: the full fp32
parameters, the layer statistics, the names of the layers cut across the partition boundary, the
partitions, the all-reduces per step and the optimizer state bytes held by each rank. With ``SAVE_AT`` it also
saves a DeepSpeed checkpoint after that many steps, resumes it in a new engine and writes the
parameters of the resumed run to ``OUTPUT_DIR/<case>-resumed.pt``.

The module also defines the model, data and cases, so the test builds its single-process
reference from the same definitions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: Layer sizes chosen so that on 2 ranks the first weight (91 elements) and the first bias (13) are
#: cut by the partition boundary under ZeRO-1/2 (each group's flat buffer is split in halves).
IN, HIDDEN1, HIDDEN2, OUT = 7, 13, 5, 3
GLOBAL_BATCH = 8
STEPS = 10

#: name -> (registry optimizer, keyword arguments); every estimator that needs no closure. MCLR with
#: ``sample_size=64`` samples the two large weights (91 and 65 elements; the first cut by the partition
#: boundary), with the default 4096 it takes all elements of every layer. The cases in :data:`JSON_TYPES`
#: reach DeepSpeed as ``"optimizer": {"type": ..., "params": ...}`` through
#: ``hf_cblr.integrations.deepspeed.initialize``; those in :data:`PLAIN_DEEPSPEED` as a plain
#: ``hf_cblr.create_optimizer(...)`` straight into ``deepspeed.initialize``; the others as that optimizer through
#: ``initialize``.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "lars": ("lars", {"lr": 0.5, "trust_coefficient": 0.02, "weight_decay": 1e-2}),
    "cblr-secant": ("cblr", {"lr": 0.1, "trust": 0.1, "curvature": "secant", "weight_decay": 1e-2}),
    "cblr-weight_norm": ("cblr", {"lr": 0.1, "trust": 0.05, "curvature": "weight_norm", "nesterov": True}),
    "cblr_adam-secant": ("cblr_adam", {"lr": 1e-2, "trust": 0.1, "curvature": "secant", "rate_rule": "inverse_curvature",
                                       "weight_decay": 1e-2}),
    "lamb": ("lamb", {"lr": 1e-2, "weight_decay": 1e-2}),
    "cblr-secant_elementwise": ("cblr", {"lr": 0.1, "trust": 0.1, "curvature": "secant_elementwise", "aggregate": "mean",
                                         "sample_size": 64, "weight_decay": 1e-2}),
    "mclr-sampled": ("mclr", {"lr": 0.1, "sample_size": 64, "weight_decay": 1e-2}),
    "mclr_adam-sampled": ("mclr_adam", {"lr": 1e-2, "sample_size": 64, "weight_decay": 1e-2}),
    "mclr": ("mclr", {"lr": 0.1, "weight_decay": 1e-2}),
    # the other cases run the default, the fused kernels on the CPU's partitions; these the foreach kernels
    "lamb-foreach": ("lamb", {"lr": 1e-2, "weight_decay": 1e-2, "fused": False}),
    "cblr-secant-foreach": ("cblr", {"lr": 0.1, "trust": 0.1, "curvature": "secant", "weight_decay": 1e-2, "fused": False}),
    "cblr_adam": ("cblr_adam", {"lr": 1e-2, "sample_size": 64, "weight_decay": 1e-2}),
}
JSON_TYPES = {"lars": "LARS", "cblr-secant": "CBLR", "mclr": "MCLR"}
#: MCLR's median over the adapted layers needs them all in one step: under ZeRO-3 one sub-group per param group.
WHOLE_GROUP_STEPS = {"mclr-sampled", "mclr_adam-sampled", "mclr", "cblr_adam"}
PLAIN_DEEPSPEED = {"cblr-weight_norm", "cblr_adam-secant"}


def build_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(IN, HIDDEN1), nn.Tanh(), nn.Linear(HIDDEN1, HIDDEN2), nn.Tanh(),
                             nn.Linear(HIDDEN2, OUT))


def batch(step: int) -> tuple[Tensor, Tensor]:
    """The global batch of ``step``."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, IN, generator=generator), torch.randn(GLOBAL_BATCH, OUT, generator=generator)


def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.mse_loss(outputs, targets)


def ds_config(stage: int, world_size: int, options: frozenset[str] = frozenset(), sub_groups: bool = True) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if "offload" in options:
        zero["offload_optimizer"] = {"device": "cpu"}
    if "round_robin" in options:
        zero["round_robin_gradients"] = True  # the flat buffer in another order than the param group
    if stage == 3:
        # several sub-groups per param group (with ``sub_groups``), and no parameter kept whole on every rank
        zero.update(sub_group_size=60 if sub_groups else 10**9, stage3_param_persistence_threshold=0)
    # gradient_clipping: DeepSpeed's default is 1.0 (runtime/constants.py), the reference does not clip
    return {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world_size, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0, "steps_per_print": 10**9, "zero_optimization": zero}


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in an optimizer state (nested dicts and lists included)."""
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(value) for value in state)
    return 0


def _engine(case: str, stage: int, options: frozenset[str], world_size: int,
            sub_groups: bool | None = None) -> tuple[Any, Any, nn.Module]:
    import deepspeed

    import hf_cblr
    from hf_cblr.integrations import deepspeed as zero

    model = build_model()
    name, kwargs = CASES[case]
    config = ds_config(stage, world_size, options, sub_groups=case not in WHOLE_GROUP_STEPS if sub_groups is None else sub_groups)
    if case in JSON_TYPES:
        config["optimizer"] = {"type": JSON_TYPES[case], "params": kwargs}
        engine, *_ = zero.initialize(model, config)
    elif case in PLAIN_DEEPSPEED:
        # what DeepSpeed asks of any client optimizer: allowed under ZeRO, kept under ZeRO-Offload
        config.update(zero_allow_untested_optimizer=True, zero_force_ds_cpu_optimizer=False)
        engine, *_ = deepspeed.initialize(model=model, optimizer=hf_cblr.create_optimizer(model, name, **kwargs), config=config)
    else:
        engine, *_ = zero.initialize(model, config, optimizer=hf_cblr.create_optimizer(model, name, **kwargs))
    return engine, engine.basic_optimizer, model


def _train(engine: Any, steps: range, rank: int, world_size: int) -> None:
    for step in steps:
        inputs, targets = batch(step)
        shard = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
        loss = loss_fn(engine(inputs[shard]), targets[shard])
        engine.backward(loss)
        engine.step()


def _full_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters, gathered (ZeRO-3) or as they are (ZeRO-1/2: whole on every rank; in fp32 the
    master weights). Not ``safe_get_full_fp32_param``: its ``_hp_mapping`` is wrong under ``round_robin_gradients``."""
    from deepspeed.runtime.zero import GatheredParameters

    with GatheredParameters(list(model.parameters())):
        return {name: param.detach().clone() for name, param in model.named_parameters()}


def main(output_dir: Path, stage: int, options: frozenset[str], save_at: int | None) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for case in CASES:
        engine, optimizer, model = _engine(case, stage, options, world_size)
        _train(engine, range(STEPS), rank, world_size)
        parameters = _full_parameters(model)
        partitions = optimizer._partitioned.partitions()
        split = sorted({name for partition in partitions for name, f in zip(partition.names, partition.fragments, strict=True)
                        if 0 < f.length < torch.Size(f.shape).numel()})
        reductions = sum(partition.distributor.calls for partition in partitions) / STEPS
        byte_counts = [torch.zeros((), dtype=torch.int64) for _ in range(world_size)]
        torch.distributed.all_gather(byte_counts, torch.tensor(state_bytes(dict(optimizer.state))))
        result = {"parameters": parameters, "layer_stats": optimizer.layer_stats(), "split_layers": split,
                  "partitions": len(partitions), "reductions_per_step": reductions,
                  "state_bytes_per_rank": [int(b) for b in byte_counts]}
        if save_at is not None:
            result["resumed"] = _resume(case, stage, options, world_size, rank, save_at, output_dir / f"{case}-checkpoint")
        if rank == 0:
            torch.save(result, output_dir / f"{case}.pt")
        engine.destroy()


def _resume(case: str, stage: int, options: frozenset[str], world_size: int, rank: int, save_at: int,
            directory: Path) -> dict[str, Tensor]:
    """Train ``save_at`` steps, save, load into a new engine, train the rest: the resumed run's parameters."""
    engine, _, _ = _engine(case, stage, options, world_size)
    _train(engine, range(save_at), rank, world_size)
    engine.save_checkpoint(str(directory), tag="step")
    engine.destroy()
    engine, _, model = _engine(case, stage, options, world_size)
    engine.load_checkpoint(str(directory), tag="step")
    _train(engine, range(save_at, STEPS), rank, world_size)
    parameters = _full_parameters(model)
    engine.destroy()
    return parameters


def resize(output_dir: Path, stage: int, phase: str) -> None:
    """Save with one world size (``resize-save``), resume with another (``resize-load``)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    engine, _, _ = _engine("lars", stage, frozenset(), world_size)
    if phase == "resize-save":
        _train(engine, range(3), rank, world_size)
        engine.save_checkpoint(str(output_dir / "resize"), tag="step")
        return
    try:
        engine.load_checkpoint(str(output_dir / "resize"), tag="step")
    except Exception as error:  # the test reads what was raised
        (output_dir / "resize-error.txt").write_text(f"{type(error).__name__}: {error}")


def refuse_sub_groups(output_dir: Path) -> None:
    """MCLR under ZeRO-3 with ``sub_group_size=60``: its adapted layers are stepped in several calls."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    engine, _, _ = _engine("mclr-sampled", 3, frozenset(), world_size, sub_groups=True)
    try:
        _train(engine, range(1), rank, world_size)
    except NotImplementedError as error:  # the test reads what was raised
        (output_dir / "sub-groups-error.txt").write_text(str(error))


if __name__ == "__main__":
    stage, *options = sys.argv[2].split("+")
    if len(sys.argv) > 3 and sys.argv[3].startswith("resize"):
        resize(Path(sys.argv[1]), int(stage), sys.argv[3])
    elif len(sys.argv) > 3 and sys.argv[3] == "sub-groups":
        refuse_sub_groups(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), int(stage), frozenset(options), int(sys.argv[3]) if len(sys.argv) > 3 else None)
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # a gloo thread can abort at interpreter exit
