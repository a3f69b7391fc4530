r"""Time each pass of the fused step's C++ CPU kernels alone on BERT-base shapes, against torch's fused AdamW step.

What a fused step costs is the sum of its passes (``docs/benchmarks.md``, "The fused step"). This times each kernel
on the weight matrices of BERT-base (the 2-D tensors of ``optimizer_step.bert_base_shapes``: 108.9 M fp32 values, where
nearly all of the step's bytes are), in turns with ``torch.optim.AdamW(fused=True)`` on the same tensors, so every
ratio is over the AdamW steps measured beside it. The columns give what each pass reads and writes (full-size fp32
tensors), to set the times against a model of the cost: bytes moved, or tensors read.

Usage::

    python benchmarks/fused_passes.py --threads 1
    python benchmarks/fused_passes.py --threads 2 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from optimizer_step import bert_base_shapes

from hf_cblr.optim._cpu_kernels import cpu_kernels

#: pass -> (tensors read, tensors written), counted from ``hf_cblr/optim/csrc/fused_cpu.cpp``.
TRAFFIC = {
    "torch AdamW fused (g, w, m, v -> w, m, v)": (4, 3),
    "adam_direction: Adam reduction pass (g, w, m, v -> m, v)": (4, 2),
    "adam_update: Adam update pass (w, m, v -> w)": (3, 1),
    "adam_step: one-pass Adam step (g, w, m, v -> w, m, v)": (4, 3),
    "momentum_update: SGD update pass (g, w, b -> w, b)": (3, 2),
    "replace: the secant's pass (p, g -> p)": (2, 1),
    "sums_of_squares: a norm pass (g)": (1, 0),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("the C++ kernels cannot be built here (see the INFO log of hf_cblr.optim._cpu_kernels)")
    generator = torch.Generator().manual_seed(0)
    shapes = [shape for _, shape in bert_base_shapes() if len(shape) > 1]
    grads = [torch.randn(shape, generator=generator) * 1e-3 for shape in shapes]
    weights = [torch.randn(shape, generator=generator) * 0.02 for shape in shapes]
    exp_avgs = [torch.zeros(shape) for shape in shapes]
    exp_avg_sqs = [torch.full(shape, 1e-6) for shape in shapes]
    buffers = [torch.zeros(shape) for shape in shapes]
    previous = [torch.zeros(shape) for shape in shapes]
    # lerp weight 1 - beta1, beta2, 1 - beta2, eps, decay factor a, direction factor b (the kernels' coefficient rows)
    adam_rows = torch.tensor([[0.1, 0.999, 0.001, 1e-8, 0.01, 1.0]] * len(shapes), dtype=torch.float64)
    # decay, rate, lr, buffer factor, direction factor, step's direction and buffer factors
    momentum_rows = torch.tensor([[0.01, 1.0, 1e-9, 0.9, 1.0, 0.0, 1.0]] * len(shapes), dtype=torch.float64)
    factors = torch.full((len(shapes),), 1e-9, dtype=torch.float64)
    adamw = torch.optim.AdamW(weights, lr=1e-9, fused=True)
    for weight, grad in zip(weights, grads, strict=True):
        weight.grad = grad
    passes: dict[str, Callable[[], object]] = dict(zip(TRAFFIC, (
        adamw.step,
        lambda: kernels.adam_direction(grads, weights, exp_avgs, exp_avg_sqs, adam_rows),
        lambda: kernels.adam_update(weights, exp_avgs, exp_avg_sqs, adam_rows, factors),
        lambda: kernels.adam_step(grads, weights, exp_avgs, exp_avg_sqs, adam_rows, factors),
        lambda: kernels.momentum_update(grads, weights, buffers, momentum_rows),
        lambda: kernels.replace_and_difference_squares(previous, grads),
        lambda: kernels.sums_of_squares(grads),
    ), strict=True))
    seconds: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(args.repeats + 1):  # the first turn warms up (page faults, AdamW's state)
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    values = sum(weight.numel() for weight in weights)
    reference = statistics.median(seconds[next(iter(passes))][1:])
    print(f"{values:,} fp32 values in {len(shapes)} weight matrices; {args.threads} thread(s); torch {torch.__version__}; "
          f"median of {args.repeats} turns")
    print("| pass | reads | writes | ms | × AdamW fused | × AdamW's bytes | × AdamW's reads |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    reads_adamw, writes_adamw = TRAFFIC[next(iter(passes))]
    for name, times in seconds.items():
        median = statistics.median(times[1:])
        reads, writes = TRAFFIC[name]
        print(f"| {name} | {reads} | {writes} | {median * 1e3:.1f} | {median / reference:.2f} | "
              f"{(reads + writes) / (reads_adamw + writes_adamw):.2f} | {reads / reads_adamw:.2f} |")


if __name__ == "__main__":
    main()
