r"""Time one ZeRO rank's ``optimizer.step()`` on its flat partition of BERT-base's layers: fused against foreach.

Under DeepSpeed ZeRO-1/2 a param group's layers are one flat buffer cut into equal parts, one per rank, and each rank
steps the fragments of the layers in its part (``docs/zero.md``). This builds that partition for rank 0 of
``--world`` ranks in one process (the layout of :func:`hf_cblr.optim.partitioned.zero12_fragments`; the all-reduce
over the ranks is the identity here: its vector is a few hundred bytes, and it is not what is timed) and steps it
with each optimizer on the foreach kernels (``fused=False``) and on the fused ones (``fused=True``), in turns, so
both see the same background load. The ratio is the fused step's median over the foreach step's: what the default
(``fused=None``) picks on CPU partitions rests on it.

Usage::

    python benchmarks/zero_partition_step.py --threads 1
    python benchmarks/zero_partition_step.py --threads 2 --world 4 --only lamb lars
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from types import SimpleNamespace
from typing import Any

import torch
from optimizer_step import bert_base_shapes
from torch import Tensor, nn

from hf_cblr.optim import get_optimizer_info
from hf_cblr.optim.partitioned import zero12_fragments
from hf_cblr.optim.types import LayerFragment

OPTIMIZERS = ("lars", "cblr", "mclr", "lamb", "cblr_adam", "mclr_adam")
#: estimators that run under ZeRO where the registry's default does not (``cblr``'s ``secant_denoised`` hooks the model)
ZERO_ARGUMENTS: dict[str, dict[str, Any]] = {"cblr": {"curvature": "secant"}}


class RankZeroLayout:
    """Rank ``rank`` of ``world`` under ZeRO-1/2: the group's flat buffer cut into ``world`` equal parts."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.distributor = SimpleNamespace(all_reduce_sum=lambda vector: vector)

    def holds_partition(self, params: list[Tensor], layers: list[Tensor]) -> bool:
        return len(params) == 1 and params[0] is not layers[0]

    def fragments(self, flat: Tensor, layers: list[Tensor]) -> tuple[list[LayerFragment], SimpleNamespace]:
        fragments = zero12_fragments(layers, list(range(len(layers))), self.rank * flat.numel(), flat.numel())
        return fragments, self.distributor


def partition_optimizer(name: str, world: int, fused: bool) -> torch.optim.Optimizer:
    """``name`` (registry defaults, lr 1e-5) stepping rank 0's partition of BERT-base's weight matrices and vectors."""
    shapes = [shape for _, shape in bert_base_shapes()]
    total = sum(math.prod(shape) for shape in shapes)
    size = math.ceil(total / world)
    buffer = torch.zeros(size * world)
    generator = torch.Generator().manual_seed(0)
    layers, offset = [], 0
    for shape in shapes:
        numel = math.prod(shape)
        view = buffer.narrow(0, offset, numel).view(shape)
        view.copy_(torch.randn(shape, generator=generator) * 0.02)
        layers.append(nn.Parameter(view))
        offset += numel
    info = get_optimizer_info(name)
    group = {"params": layers, "param_names": [f"layer{i}" for i in range(len(layers))], "weight_decay": 0.01}
    optimizer = info.optimizer_class([group], partition_layout=RankZeroLayout(0, world),
                                     **info.arguments(lr=1e-5, fused=fused, **ZERO_ARGUMENTS.get(name, {})))
    partition = buffer[:size].clone()
    partition.grad = torch.randn(size, generator=generator) * 1e-3
    optimizer.param_groups[0]["params"] = [partition]  # what ZeRO does to the optimizer's groups
    return optimizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--world", type=int, default=2, help="ranks the layers are partitioned over (rank 0 is timed)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"rank 0 of {args.world} (ZeRO-1/2 layout) of BERT-base's 201 tensors; {args.threads} thread(s); "
          f"torch {torch.__version__}; median of {args.repeats} steps after {args.warmup}")
    print("| optimizer | foreach ms | fused ms | fused / foreach |")
    print("|---|---:|---:|---:|")
    for name in args.only:
        optimizers = {fused: partition_optimizer(name, args.world, fused) for fused in (False, True)}
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for turn in range(args.warmup + args.repeats):
            for fused, optimizer in optimizers.items():
                start = time.perf_counter()
                optimizer.step()
                if turn >= args.warmup:
                    seconds[fused].append(time.perf_counter() - start)
        foreach, fused = (statistics.median(seconds[key]) for key in (False, True))
        print(f"| {name} | {foreach * 1e3:.1f} | {fused * 1e3:.1f} | {fused / foreach:.2f} |", flush=True)
        del optimizers


if __name__ == "__main__":
    main()
