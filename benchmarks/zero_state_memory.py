"""Optimizer-state bytes held by each rank under DeepSpeed ZeRO-1/2/3, for 1, 2, 4... ranks.

Run with ``torchrun`` (CPU, gloo; ``DS_ACCELERATOR=cpu``)::

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 benchmarks/zero_state_memory.py
    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 4 benchmarks/zero_state_memory.py --scale 0.1

For each ZeRO stage and optimizer: a BERT ``BertForSequenceClassification`` built from a config
(``--scale`` as in ``state_memory.py``, fp32, no download) in a DeepSpeed engine, two training steps
on random tokens, then the bytes of every tensor in the optimizer's state on each rank (moments,
momentum, previous gradients, per-layer scalars). Printed per optimizer: the largest per-rank
count, bytes per model parameter, and the ratio to torch AdamW's per-rank state in the same run
(DeepSpeed partitions AdamW's moments the same way). Multiply the world sizes' tables to read the
``1/N`` scaling; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from state_memory import WEIGHT_DECAY, bert, state_bytes, torch_groups

import hf_cblr

#: name -> builder of the optimizer on a model (ours grouped like the Trainer: weight decay on tensors with ndim >= 2)
OPTIMIZERS: dict[str, Any] = {
    "torch AdamW": lambda model: torch.optim.AdamW(torch_groups(model), lr=1e-4),
    "cblr (secant)": lambda model: hf_cblr.create_optimizer(model, "cblr", lr=0.1, weight_decay=WEIGHT_DECAY),
    "lars": lambda model: hf_cblr.create_optimizer(model, "lars", lr=0.1, weight_decay=WEIGHT_DECAY),
    "cblr_adam (secant)": lambda model: hf_cblr.create_optimizer(model, "cblr_adam", lr=1e-4, weight_decay=WEIGHT_DECAY),
    "lamb": lambda model: hf_cblr.create_optimizer(model, "lamb", lr=1e-4, weight_decay=WEIGHT_DECAY),
    "mclr": lambda model: hf_cblr.create_optimizer(model, "mclr", lr=0.1, weight_decay=WEIGHT_DECAY),
}
BATCH_PER_RANK, SEQUENCE_LENGTH = 4, 32


def per_rank_state_bytes(name: str, stage: int, scale: float) -> tuple[list[int], int]:
    """The optimizer-state bytes on every rank after two steps under ZeRO ``stage``, and the parameter count."""
    import deepspeed

    from hf_cblr.integrations import deepspeed as zero

    model: nn.Module = bert(scale, seed=0)
    num_parameters = sum(p.numel() for p in model.parameters())
    config = {"train_micro_batch_size_per_gpu": BATCH_PER_RANK, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0, "steps_per_print": 10**9, "zero_optimization": {"stage": stage}}
    optimizer = OPTIMIZERS[name](model)
    if isinstance(optimizer, hf_cblr.CBLR):
        engine, *_ = zero.initialize(model, config, optimizer=optimizer)
    else:
        config["zero_allow_untested_optimizer"] = True
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(dist.get_rank())
    vocab_size = model.config.vocab_size
    for _ in range(2):
        tokens = torch.randint(vocab_size, (BATCH_PER_RANK, SEQUENCE_LENGTH), generator=generator)
        labels = torch.randint(2, (BATCH_PER_RANK,), generator=generator)
        engine.backward(engine(input_ids=tokens, labels=labels).loss)
        engine.step()
    counts = [torch.zeros((), dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor(state_bytes(engine.basic_optimizer)))
    engine.destroy()
    return [int(count) for count in counts], num_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.25, help="BERT-base sizes times this (default 0.25)")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--only", nargs="+", choices=list(OPTIMIZERS), help="these optimizers (torch AdamW always runs)")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args()

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    names = ["torch AdamW", *(name for name in OPTIMIZERS if name != "torch AdamW" and (not args.only or name in args.only))]
    rows = []
    for stage in args.stages:
        adamw_bytes = None
        for name in names:
            counts, num_parameters = per_rank_state_bytes(name, stage, args.scale)
            adamw_bytes = max(counts) if adamw_bytes is None else adamw_bytes
            rows.append({"stage": stage, "world_size": world_size, "optimizer": name, "parameters": num_parameters,
                         "max_bytes_per_rank": max(counts), "bytes_per_rank": counts,
                         "bytes_per_parameter_per_rank": max(counts) / num_parameters,
                         "ratio_to_adamw": max(counts) / adamw_bytes})
    if rank == 0:
        print(f"\nZeRO optimizer state per rank, world size {world_size}, {rows[0]['parameters']:,} parameters")
        print(f"{'stage':>5}  {'optimizer':<20} {'max bytes/rank':>15} {'B/param/rank':>13} {'x AdamW':>8}")
        for row in rows:
            print(f"{row['stage']:>5}  {row['optimizer']:<20} {row['max_bytes_per_rank']:>15,} "
                  f"{row['bytes_per_parameter_per_rank']:>13.3f} {row['ratio_to_adamw']:>8.2f}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # a gloo thread can abort the interpreter at exit


if __name__ == "__main__":
    main()
