"""Optimizer-state bytes held by each rank under PyTorch FSDP2 (``fully_shard``), for 1, 2, 4... ranks.

Run with ``torchrun`` (CPU, gloo)::

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp2_state_memory.py --scale 0.1

For each optimizer: a BERT ``BertForSequenceClassification`` built from a config (``--scale`` as in
``state_memory.py``, fp32, no download), every encoder layer, the embeddings and the root passed to ``fully_shard``,
two training steps on random tokens, then the bytes of every tensor in the optimizer's state on each rank (a DTensor's
local shard only). Printed per optimizer: the largest per-rank count, bytes per model parameter, and the ratio to
torch AdamW's per-rank state in the same run (FSDP2 shards AdamW's moments the same way). ``--json`` writes the rows.
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
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from state_memory import WEIGHT_DECAY, bert, state_bytes, torch_groups

import hf_cblr

#: name -> builder of the optimizer on a sharded model (ours grouped like the Trainer: weight decay on ndim >= 2)
OPTIMIZERS: dict[str, Any] = {
    "torch AdamW": lambda model: torch.optim.AdamW(torch_groups(model), lr=1e-4),
    "cblr (secant)": lambda model: hf_cblr.create_optimizer(model, "cblr", lr=0.1, curvature="secant",
                                                            weight_decay=WEIGHT_DECAY),
    "lars": lambda model: hf_cblr.create_optimizer(model, "lars", lr=0.1, weight_decay=WEIGHT_DECAY),
    "cblr_adam (secant)": lambda model: hf_cblr.create_optimizer(model, "cblr_adam", lr=1e-4, curvature="secant",
                                                                 weight_decay=WEIGHT_DECAY),
    "lamb": lambda model: hf_cblr.create_optimizer(model, "lamb", lr=1e-4, weight_decay=WEIGHT_DECAY),
    "mclr": lambda model: hf_cblr.create_optimizer(model, "mclr", lr=0.1, weight_decay=WEIGHT_DECAY),
}
BATCH_PER_RANK, SEQUENCE_LENGTH = 4, 32


def per_rank_state_bytes(name: str, scale: float) -> tuple[list[int], int]:
    """The optimizer-state bytes on every rank after two steps under FSDP2, and the parameter count."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = bert(scale, seed=0)
    num_parameters = sum(p.numel() for p in model.parameters())
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.bert.embeddings, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = OPTIMIZERS[name](model)
    generator = torch.Generator().manual_seed(dist.get_rank())
    vocab_size = model.config.vocab_size
    for _ in range(2):
        tokens = torch.randint(vocab_size, (BATCH_PER_RANK, SEQUENCE_LENGTH), generator=generator)
        labels = torch.randint(2, (BATCH_PER_RANK,), generator=generator)
        optimizer.zero_grad()
        model(input_ids=tokens, labels=labels).loss.backward()
        optimizer.step()
    counts = [torch.zeros((), dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor(state_bytes(optimizer)))
    return [int(count) for count in counts], num_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.25, help="BERT-base sizes times this (default 0.25)")
    parser.add_argument("--only", nargs="+", choices=list(OPTIMIZERS), help="these optimizers (torch AdamW always runs)")
    parser.add_argument("--json", type=Path, help="write the rows here (rank 0)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    names = ["torch AdamW", *[name for name in args.only or OPTIMIZERS if name != "torch AdamW"]]
    rows = []
    for name in names:
        counts, num_parameters = per_rank_state_bytes(name, args.scale)
        rows.append({"optimizer": name, "world_size": dist.get_world_size(), "bytes_per_rank": counts,
                     "max_bytes": max(counts), "bytes_per_parameter": max(counts) / num_parameters})
    if dist.get_rank() == 0:
        adamw = rows[0]["max_bytes"]
        print(f"{num_parameters:,} parameters, {dist.get_world_size()} ranks (FSDP2)")
        for row in rows:
            print(f"{row['optimizer']:22s} {row['max_bytes']:>14,} B/rank  {row['bytes_per_parameter']:6.2f} B/param  "
                  f"x AdamW {row['max_bytes'] / adamw:.2f}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
