"""torchrun worker: ``CBLRTrainer`` with a DeepSpeed ZeRO-2 config dict on 2 CPU ranks (gloo), fp32.

``python -m torch.distributed.run --standalone --nproc_per_node 2 ds_trainer_worker.py OUTPUT_DIR [DEEPSPEED_JSON]``

Without ``DEEPSPEED_JSON``, two runs of :data:`STEPS` steps on the tiny BERT: one with the optimizer in the DeepSpeed
config (``"optimizer": {"type": "CBLR", ...}``, ``optim`` left at the stock default), one without an optimizer section
(``optim="cblr"``). With ``DEEPSPEED_JSON``, one run ``json`` from that file, ``optim`` left at the stock default and
the training arguments :data:`JSON_RUN_ARGUMENTS` (which fill its ``"auto"`` values). Rank 0 writes
``OUTPUT_DIR/<run>.pt``: the parameters, the layer statistics, the names of the layers cut across the two ranks'
partitions and what trained (:func:`what_trained`). The module also defines the data, model and arguments, so that the
test runs its single-process reference (``CBLRTrainer`` without DeepSpeed) from the same definitions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import IndexedDataset, tiny_bert

from hf_cblr.integrations import find_optimizer
from hf_cblr.trainer import CBLRTrainer, CBLRTrainingArguments

STEPS = 3
GLOBAL_BATCH = 8
#: The optimizer of every run: optim_args of the reference and of the run without a section, "params" of the section.
TRUST = 0.1
#: ZeRO refuses the default secant_denoised (its hooks read the model parameters' per-pass gradients).
CURVATURE = "secant"
RUNS = ("config_section", "optim")
#: The training arguments of the run from a DeepSpeed JSON: not the defaults, so that the "auto" values they fill show.
JSON_RUN_ARGUMENTS: dict[str, Any] = {"learning_rate": 2e-3, "adam_beta1": 0.8, "adam_beta2": 0.99, "adam_epsilon": 1e-7}


def training_args(output_dir: str, per_device_batch: int, learning_rate: float = 0.05, **kwargs: Any) -> CBLRTrainingArguments:
    """No clipping (``max_grad_norm=0``, which fills DeepSpeed's ``"gradient_clipping": "auto"``), the batches in order."""
    return CBLRTrainingArguments(
        output_dir=output_dir, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
        learning_rate=learning_rate, weight_decay=0.01, max_grad_norm=0.0, max_steps=STEPS,
        train_sampling_strategy="sequential", per_device_train_batch_size=per_device_batch, **kwargs)


def dataset() -> IndexedDataset:
    return IndexedDataset(STEPS * GLOBAL_BATCH)


def what_trained(trainer: CBLRTrainer) -> dict[str, Any]:
    """The optimizer that stepped (class, base, hyperparameters, each group's weight decay), the optimizer steps taken
    and the ZeRO stage of the DeepSpeed engine (None without DeepSpeed)."""
    optimizer = find_optimizer(trainer.optimizer)
    engine = trainer.model_wrapped
    return {"class": type(optimizer).__name__, "base": optimizer.base, "name": trainer.optimizer_name,
            "lr": optimizer.defaults["lr"], "betas": optimizer.defaults.get("betas"), "eps": optimizer.defaults.get("eps"),
            "weight_decays": sorted({group["weight_decay"] for group in optimizer.param_groups}),
            "steps": trainer.state.global_step,
            "zero_stage": engine.zero_optimization_stage() if trainer.is_deepspeed_enabled else None}


def train(args: CBLRTrainingArguments) -> dict[str, Any]:
    """Train the tiny BERT (no dropout); its parameters, layer statistics, the layers cut by a ZeRO partition and
    :func:`what_trained`."""
    trainer = CBLRTrainer(model=tiny_bert(), args=args, train_dataset=dataset())
    trainer.train()
    optimizer = find_optimizer(trainer.optimizer)
    split = sorted({name for partition in optimizer._partitioned.partitions()
                    for name, f in zip(partition.names, partition.fragments, strict=True)
                    if 0 < f.length < torch.Size(f.shape).numel()})
    return {"parameters": {name: param.detach().clone() for name, param in trainer.model.named_parameters()},
            "layer_stats": optimizer.layer_stats(), "split_layers": split, "trained": what_trained(trainer)}


def deepspeed_config(section: bool) -> dict[str, Any]:
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}
    if section:
        config["optimizer"] = {"type": "CBLR", "params": {"lr": "auto", "weight_decay": "auto", "trust": TRUST,
                                                         "curvature": CURVATURE}}
    return config


def main(output_dir: Path, deepspeed_json: str | None) -> None:
    from accelerate.state import AcceleratorState, PartialState

    world_size = int(os.environ["WORLD_SIZE"])
    runs: dict[str, dict[str, Any]] = {"json": {"deepspeed": deepspeed_json, **JSON_RUN_ARGUMENTS}} if deepspeed_json else {
        "config_section": {"deepspeed": deepspeed_config(section=True)},
        "optim": {"deepspeed": deepspeed_config(section=False), "optim": "cblr",
                  "optim_args": f"trust={TRUST},curvature={CURVATURE}"},
    }
    for run, arguments in runs.items():
        AcceleratorState._reset_state()
        PartialState._reset_state()
        result = train(training_args(str(output_dir / run), GLOBAL_BATCH // world_size, **arguments))
        if torch.distributed.get_rank() == 0:
            torch.save(result, output_dir / f"{run}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # a gloo thread can abort at interpreter exit
