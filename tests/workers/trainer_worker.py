"""Multi-process CBLRTrainer scenarios, run by tests/test_trainer_multiprocess.py under
``torchrun --standalone --nproc_per_node 2`` (gloo, CPU). Each rank writes ``OUT/<scenario>-rank<r>.json``.

Scenarios of ``ddp``: exact dropping, batch-size ramping, the hvp closure. Scenarios of ``deepspeed``
(``DS_ACCELERATOR=cpu``): what trains is ours with ZeRO-2, with ZeRO-Offload, with an optimizer instance,
the errors for a forced DeepSpeedCPUAdam and for a DeepSpeed "optimizer" section, and a plain Trainer under
ZeRO-Offload, whose optimizer Accelerate replaces unless its config went through prepare_deepspeed_config.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import IndexedDataset, kept_mean_gradient, sample_indices, tiny_bert

from hf_cblr import CBLR
from hf_cblr.integrations import (
    OptimizerCheckCallback,
    find_optimizer,
    optimizer_cls_and_kwargs,
    prepare_deepspeed_config,
)
from hf_cblr.optim.partitioned import LAYERS_KEY
from hf_cblr.trainer import CBLRTrainer, CBLRTrainingArguments


def _args(output_dir: str, **kwargs: Any) -> CBLRTrainingArguments:
    defaults = dict(output_dir=output_dir, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                    disable_tqdm=True, learning_rate=0.01, optim="cblr", max_grad_norm=0.0, ddp_backend="gloo")
    return CBLRTrainingArguments(**{**defaults, **kwargs})


class GradientCapture(TrainerCallback):
    def __init__(self) -> None:
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.gradients.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


class RecordingTrainer(CBLRTrainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.micro_batches: dict[int, list[list[int]]] = defaultdict(list)

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        if model.training:
            self.micro_batches[self.state.global_step].append(sample_indices(inputs))
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((a[name] - b[name]).abs().max().item() for name in a)


def _gathered(value: Any) -> list[Any]:
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def drop(output_dir: str) -> dict[str, Any]:
    """One step, 2 ranks x 2 micro-batches of 2: pools {0..3} and {4..7}; a quarter of each dropped."""
    results = {}
    dataset = IndexedDataset(16)
    for scoring in ("with_grad", "no_grad"):
        model, capture = tiny_bert(), GradientCapture()
        reference = copy.deepcopy(model)
        args = _args(output_dir, optim="sgd", per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                     train_sampling_strategy="sequential", drop_fraction=0.25, drop_scoring=scoring)
        trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset, callbacks=[capture])
        trainer.train()
        expected = kept_mean_gradient(reference, dataset, [[0, 1, 2, 3], [4, 5, 6, 7]], 0.25)
        logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
        results[scoring] = {"max_gradient_error": _max_difference(capture.gradients[0], expected),
                            "gradient_norm": sum(g.norm() ** 2 for g in expected.values()).item() ** 0.5,
                            "micro_batches": trainer.micro_batches[0], "kept_fraction": logged["kept_fraction"]}
    return results


def ramp(output_dir: str) -> dict[str, Any]:
    """2 ranks x 2 micro-batches: sizes 4, 4, 8, 8, 16 (per rank and micro-batch: 1, 1, 2, 2, 4)."""
    args = _args(output_dir, batch_size_schedule="milestones:0=4,8=8,24=16", per_device_train_batch_size=4,
                 gradient_accumulation_steps=2, max_steps=5)
    trainer = RecordingTrainer(model=tiny_bert(), args=args, train_dataset=IndexedDataset(20))
    trainer.train()
    logged = [entry["global_batch_size"] for entry in trainer.state.log_history if "loss" in entry]
    parameters = {name: param.detach() for name, param in trainer.model.named_parameters()}
    return {"micro_batches": {step: batches for step, batches in trainer.micro_batches.items()}, "logged": logged,
            "parameters_match_rank0": _max_difference(parameters, _gathered(parameters)[0]) == 0.0}


def hvp(output_dir: str) -> dict[str, Any]:
    """The hvp curvature of a 2-rank step equals the single-process curvature of the global batch's mean loss."""
    dataset = IndexedDataset(16)
    model = tiny_bert()
    reference_model = copy.deepcopy(model)
    options = "curvature=hvp,trust=0.01"
    args = _args(output_dir, optim_args=options, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                 train_sampling_strategy="sequential")
    trainer = CBLRTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    ours = find_optimizer(trainer.optimizer)
    curvatures = {name: ours.state[param]["curvature"].item() for group in ours.param_groups
                  for name, param in zip(group["param_names"], group["params"], strict=True)}

    reference = CBLR(reference_model.named_parameters(), lr=0.01, curvature="hvp", trust=0.01)
    batch = dataset.batch(list(range(8)))

    def loss() -> torch.Tensor:
        return reference_model(**batch).loss

    loss().backward()
    reference.step(loss)
    expected = {name: reference.state[param]["curvature"].item() for group in reference.param_groups
                for name, param in zip(group["param_names"], group["params"], strict=True)}
    errors = [abs(curvatures[name] - value) / max(abs(value), 1e-12) for name, value in expected.items()
              if not name.endswith("key.bias") and value > 0]
    return {"max_relative_error": max(errors), "compared": len(errors), "same_on_all_ranks": len(set(_gathered(
        tuple(sorted(curvatures.items()))))) == 1}


def _deepspeed_config(stage: int, offload: bool = False, **extra: Any) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
            "gradient_clipping": "auto", "zero_optimization": zero, **extra}


def _reset_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state()
    PartialState._reset_state()


def _train_deepspeed(output_dir: str, config: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    _reset_accelerate_state()
    optimizer = kwargs.pop("optimizer", None)
    model = kwargs.pop("model", None) or tiny_bert()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    args = _args(output_dir, optim="cblr", optim_args="trust=0.5,curvature=secant", deepspeed=config,
                 per_device_train_batch_size=4, max_steps=2, **kwargs)
    trainer = CBLRTrainer(model=model, args=args, train_dataset=IndexedDataset(16),
                          optimizers=(optimizer, None))
    trainer.train()
    ours = find_optimizer(trainer.optimizer)
    # Under ZeRO the state is per flat partition, its per-layer step counts one vector (hf_cblr.optim.partitioned).
    steps = ({int(step) for state in ours.state.values() for step in state[LAYERS_KEY]["step"].tolist()}
             if ours is not None else set())
    changed = any(not torch.equal(before[name], param.detach()) for name, param in trainer.model.named_parameters()
                  if name in before)
    return {"ours": ours is not None, "is_client_instance": ours is optimizer,
            "steps": sorted(steps), "parameters_changed": changed,
            "zero_force_ds_cpu_optimizer": trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get(
                "zero_force_ds_cpu_optimizer")}


def _expect_error(output_dir: str, config: dict[str, Any]) -> str:
    _reset_accelerate_state()
    try:
        args = _args(output_dir, optim="cblr", optim_args="curvature=secant", deepspeed=config, per_device_train_batch_size=4,
                     max_steps=1)
        CBLRTrainer(model=tiny_bert(), args=args, train_dataset=IndexedDataset(16)).train()
    except ValueError as error:
        return str(error)
    return "no error"


def _plain_trainer_offload(output_dir: str, prepare: bool) -> dict[str, Any]:
    """A plain transformers.Trainer with the helper's (class, kwargs) under ZeRO-Offload (accelerate#2169)."""
    _reset_accelerate_state()
    config = _deepspeed_config(2, offload=True)
    if prepare:
        prepare_deepspeed_config(config)
    args = TrainingArguments(output_dir=output_dir, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                             max_steps=1, per_device_train_batch_size=4, deepspeed=config, ddp_backend="gloo")
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=IndexedDataset(16), callbacks=[OptimizerCheckCallback()],
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("cblr", "curvature=secant", training_args=args))
    try:
        trainer.train()
    except RuntimeError as error:
        return {"error": str(error)}
    return {"ours": find_optimizer(trainer.optimizer) is not None}


def deepspeed(output_dir: str) -> dict[str, Any]:
    model = tiny_bert()
    client = CBLR(model.named_parameters(), lr=0.01, trust=0.5, curvature="secant")  # ZeRO refuses secant_denoised
    return {
        "zero2": _train_deepspeed(output_dir, _deepspeed_config(2)),
        "zero2_offload": _train_deepspeed(output_dir, _deepspeed_config(2, offload=True)),
        "client_instance": _train_deepspeed(output_dir, _deepspeed_config(1), model=model, optimizer=client),
        "forced_cpu_adam": _expect_error(output_dir, _deepspeed_config(2, offload=True, zero_force_ds_cpu_optimizer=True)),
        "optimizer_section": _expect_error(output_dir, _deepspeed_config(1, optimizer={"type": "AdamW",
                                                                                      "params": {"lr": "auto"}})),
        "plain_trainer_offload": _plain_trainer_offload(output_dir, prepare=False),
        "plain_trainer_offload_prepared": _plain_trainer_offload(output_dir, prepare=True),
    }


SCENARIOS = {"ddp": (drop, ramp, hvp), "deepspeed": (deepspeed,)}


def main() -> None:
    group, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    with tempfile.TemporaryDirectory() as output_dir:
        results = {scenario.__name__: scenario(output_dir) for scenario in SCENARIOS[group]}
    (out / f"{group}-rank{rank}.json").write_text(json.dumps(results))
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
