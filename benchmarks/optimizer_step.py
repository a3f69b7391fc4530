r"""Time ``optimizer.step()`` on BERT-base-shaped parameters (random data, no download).

The parameters are the 201 tensors of ``BertForSequenceClassification`` (BERT-base, 2 labels):
109,483,778 values. Gradients are drawn once from a fixed seed and kept for every step. Param
groups follow Hugging Face's ``Trainer``: weight decay (and, for ours, the layer rate) on tensors
with ``ndim >= 2``, neither on biases and LayerNorm parameters. Our optimizers run with their registry
defaults (row ``cblr_adam``: the median of element-wise secants) or the estimator their row names (``cblr secant``,
``cblr_adam secant``: the plain layer secant, whose ``secant_denoised`` and ``secant_pooled`` add hooks on the backward
pass, not the step), and include what every step of theirs does: the per-layer statistics behind ``layer_stats()``.

Every optimizer is warmed up (``--warmup`` steps: state allocation, first estimates), then timed
over ``--repeats`` steps, alternating with steps of the reference, torch AdamW-foreach, in turns of
``--block`` consecutive steps of which the last is timed (``torch.cuda.synchronize()`` around it on
GPU). Alternating exposes both to the same background load; the untimed steps of a turn keep one
optimizer's allocations (page faults on the CPU) from changing the other's time. All optimizers
step the same parameters, with an lr small enough that they barely move (a step's cost does not
depend on the values). The table gives the median, the interquartile range,
and the ratio of the median to the median of the AdamW steps alternated with it. Fused AdamW is
timed wherever torch has the kernel (CUDA, and CPU in recent torch), and every row's median is also given as a
ratio to its median (not alternated: read it with the row's own AdamW-foreach ratio). Our optimizers are
timed on their foreach kernels, on the fused kernels (``fused=True``, rows ``(fused)``; the first step compiles,
its time is the ``first step`` column) and, unless ``--no-reference-paths``, on the single-tensor loop.

Peak extra memory: after the timed steps, one more step of each optimizer with the peak resident set size reset
before it (``/proc/self/clear_refs``; on CUDA the allocator's peak): the most memory the step held beyond what
the process held before it (full-size temporaries; 0 for a step that allocates nothing new).

Byte floor: an AdamW step must at least read ``p, g, m, v`` and write ``p, m, v``, that is
``7 * s * N`` bytes for ``N`` values of ``s`` bytes each (``s = 4`` in fp32; torch keeps AdamW's
state in the parameter dtype, so ``s = 2`` in bf16). With ``B`` the memory bandwidth measured in
the same run by the fastest of 20 in-place adds of two 256 MiB tensors, ``x += y`` (``B = 3 * nbytes / t``: it reads
``x`` and ``y`` and writes ``x``; an in-place update, like the optimizers', so no write-allocate read
of a separate destination is uncounted), no AdamW step can take less than ``7 * s * N / B``.

Usage::

    python benchmarks/optimizer_step.py                      # full size, CPU, fp32
    python benchmarks/optimizer_step.py --scale 0.1 --repeats 5 --warmup 2   # quick check
    python benchmarks/optimizer_step.py --device cuda --dtype bf16 --json out.json
    python benchmarks/optimizer_step.py --threads 1 --no-reference-paths --json cpu_1thread.json   # fused vs AdamW fused
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

import hf_cblr

HIDDEN, INTERMEDIATE, VOCAB, POSITIONS, TOKEN_TYPES, LAYERS, LABELS = 768, 3072, 30522, 512, 2, 12, 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REFERENCE = "torch AdamW foreach"
FUSED_ADAMW = "torch AdamW fused"


def bert_base_shapes(scale: float = 1.0) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the parameters of BERT-base ``BertForSequenceClassification``.

    ``scale`` multiplies the hidden, intermediate, vocabulary and position sizes (the tensor count
    stays 201: 5 embedding tensors, 16 per layer for 12 layers, 2 pooler, 2 classifier).
    """

    def sized(n: int) -> int:
        return max(1, round(n * scale))

    hidden, intermediate, vocab, positions = sized(HIDDEN), sized(INTERMEDIATE), sized(VOCAB), sized(POSITIONS)
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("bert.embeddings.word_embeddings.weight", (vocab, hidden)),
        ("bert.embeddings.position_embeddings.weight", (positions, hidden)),
        ("bert.embeddings.token_type_embeddings.weight", (TOKEN_TYPES, hidden)),
        ("bert.embeddings.LayerNorm.weight", (hidden,)),
        ("bert.embeddings.LayerNorm.bias", (hidden,)),
    ]
    for layer in range(LAYERS):
        prefix = f"bert.encoder.layer.{layer}"
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes += [(f"{prefix}.{name}.weight", (hidden, hidden)), (f"{prefix}.{name}.bias", (hidden,))]
        shapes += [
            (f"{prefix}.attention.output.LayerNorm.weight", (hidden,)),
            (f"{prefix}.attention.output.LayerNorm.bias", (hidden,)),
            (f"{prefix}.intermediate.dense.weight", (intermediate, hidden)),
            (f"{prefix}.intermediate.dense.bias", (intermediate,)),
            (f"{prefix}.output.dense.weight", (hidden, intermediate)),
            (f"{prefix}.output.dense.bias", (hidden,)),
            (f"{prefix}.output.LayerNorm.weight", (hidden,)),
            (f"{prefix}.output.LayerNorm.bias", (hidden,)),
        ]
    shapes += [
        ("bert.pooler.dense.weight", (hidden, hidden)),
        ("bert.pooler.dense.bias", (hidden,)),
        ("classifier.weight", (LABELS, hidden)),
        ("classifier.bias", (LABELS,)),
    ]
    return shapes


class TimmStyleLars(Optimizer):
    """LARS written the way ``timm.optim.Lars`` writes it: a Python loop over parameters.

    Per parameter: ``|w|``, ``|g|``, the trust ratio ``tau |w| / (|g| + beta |w| + eps)`` (1 where a
    norm is 0), ``d = (g + beta w) * ratio``, momentum ``b = mu b + d``, ``w -= lr b``. As in timm,
    the ratio applies only to groups with weight decay.
    """

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coeff: float = 0.001, eps: float = 1e-8) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coeff=trust_coeff, eps=eps))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            weight_decay, momentum, trust_coeff = group["weight_decay"], group["momentum"], group["trust_coeff"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if weight_decay != 0:
                    w_norm = p.norm(2.0)
                    g_norm = grad.norm(2.0)
                    trust_ratio = trust_coeff * w_norm / (g_norm + w_norm * weight_decay + group["eps"])
                    trust_ratio = torch.where(w_norm > 0, torch.where(g_norm > 0, trust_ratio, 1.0), 1.0)
                    grad = grad.add(p, alpha=weight_decay).mul_(trust_ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    buf = state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(grad)
                p.add_(buf, alpha=-group["lr"])


@dataclass
class Result:
    name: str
    median_ms: float
    iqr_ms: float
    #: Median of the AdamW-foreach steps alternated with this optimizer's, and the ratio to it.
    reference_ms: float = math.nan
    ratio: float = math.nan
    #: The median over the median of the torch AdamW fused steps of the same run (not alternated).
    ratio_to_fused_adamw: float = math.nan
    #: The first step (a fused optimizer's compile), and the peak memory of one step beyond what was held before it.
    first_step_ms: float = math.nan
    peak_extra_mb: float = math.nan


def torch_groups(named: list[tuple[str, Tensor]], weight_decay: float) -> list[dict[str, Any]]:
    """Hugging Face ``Trainer``'s grouping: weight decay on tensors with ``ndim >= 2`` only."""
    return [
        {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
    ]


def our_groups(named: list[tuple[str, Tensor]], weight_decay: float) -> list[dict[str, Any]]:
    """The same split, named, with our two masks (weight decay and layer rate on ``ndim >= 2``)."""
    return [
        {"params": [(n, p) for n, p in named if p.ndim >= 2], "weight_decay": weight_decay,
         "weight_decay_mask": True, "adaptation_mask": True},
        {"params": [(n, p) for n, p in named if p.ndim < 2], "weight_decay": 0.0,
         "weight_decay_mask": False, "adaptation_mask": False},
    ]


def optimizer_factories(reference_paths: bool,
                        fused_paths: bool = True) -> dict[str, Callable[[list[tuple[str, Tensor]]], Optimizer]]:
    """Name -> builder from named parameters. lr is small: the weights barely move over the run. Ours on the foreach
    kernels, on the fused ones (``fused_paths``) and on the single-tensor loop (``reference_paths``)."""
    wd, lr = 0.01, 1e-5
    factories: dict[str, Callable[[list[tuple[str, Tensor]]], Optimizer]] = {
        REFERENCE: lambda named: torch.optim.AdamW(torch_groups(named, wd), lr=lr, foreach=True),
        FUSED_ADAMW: lambda named: torch.optim.AdamW(torch_groups(named, wd), lr=lr, fused=True),
        "torch SGD momentum foreach": lambda named: torch.optim.SGD(torch_groups(named, wd), lr=lr, momentum=0.9, foreach=True),
        "timm-style LARS loop": lambda named: TimmStyleLars(torch_groups(named, wd), lr=lr, weight_decay=wd),
    }
    ours: dict[str, tuple[str, dict[str, Any]]] = {
        "cblr secant": ("cblr", {"curvature": "secant"}),
        "cblr secant_elementwise": ("cblr", {"curvature": "secant_elementwise"}),
        "cblr weight_norm": ("cblr", {"curvature": "weight_norm"}),
        "lars": ("lars", {}),
        "mclr": ("mclr", {}),
        "cblr_adam": ("cblr_adam", {}),
        "cblr_adam secant": ("cblr_adam", {"curvature": "secant"}),
        "cblr_adam secant_sampled": ("cblr_adam", {"curvature": "secant_sampled"}),
        "mclr_adam": ("mclr_adam", {}),
        "lamb": ("lamb", {}),
    }
    paths: list[tuple[str, dict[str, Any]]] = [("", {"foreach": True})]
    paths += [(" (fused)", {"fused": True})] if fused_paths else []
    paths += [(" (foreach=False)", {"foreach": False})] if reference_paths else []
    for suffix, path in paths:
        for label, (name, kwargs) in ours.items():
            factories[label + suffix] = (lambda named, name=name, kwargs=kwargs, path=path: hf_cblr.create_optimizer(
                our_groups(named, wd), name, lr=lr, **path, **kwargs))
    return factories


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(optimizer: Optimizer, device: torch.device) -> float:
    """Seconds of one ``optimizer.step()``, synchronized on GPU."""
    synchronize(device)
    start = time.perf_counter()
    optimizer.step()
    synchronize(device)
    return time.perf_counter() - start


def time_paired(candidate: Optimizer, reference: Optimizer, device: torch.device, warmup: int,
                repeats: int, block: int) -> tuple[list[float], list[float], float]:
    """Step times of ``candidate`` and of ``reference``, alternating, after ``warmup`` candidate steps.

    Alternating exposes both to the same background load, so their ratio holds on a busy machine.
    Both step the same parameters; the step cost does not depend on their values. Each turn is ``block``
    consecutive steps of which the last is timed: on the CPU a step that allocates full-size tensors
    costs more or less depending on what the other optimizer left in the allocator (page faults), and the
    untimed steps let each settle into its own steady state. Also returns the time of the candidate's first step
    (its state allocation; on the fused kernels, their compile).
    """
    first_step = timed_step(candidate, device)
    for _ in range(warmup - 1):
        candidate.step()
    candidate_times, reference_times = [], []
    for _ in range(repeats):
        for optimizer, times in ((reference, reference_times), (candidate, candidate_times)):
            for _ in range(block - 1):
                optimizer.step()
            times.append(timed_step(optimizer, device))
    return candidate_times, reference_times, first_step


def _resident_bytes(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak) of this process, in bytes (Linux)."""
    with open("/proc/self/status") as status:
        return 1024 * int(next(line.split()[1] for line in status if line.startswith(field + ":")))


def peak_extra_bytes(optimizer: Optimizer, device: torch.device) -> float:
    """The most memory one ``optimizer.step()`` holds beyond what was held before it: on CUDA from the allocator's
    peak; on the CPU from the peak resident set size, reset before the step (``/proc/self/clear_refs``; NaN where
    that is not available)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        optimizer.step()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    try:
        gc.collect()
        before = _resident_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set size
        optimizer.step()
        return float(max(0, _resident_bytes("VmHWM") - before))
    except OSError:
        return math.nan


def summarize(name: str, seconds: list[float]) -> Result:
    ms = sorted(1e3 * s for s in seconds)
    quartiles = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return Result(name, statistics.median(ms), quartiles[2] - quartiles[0])


def add_bandwidth(device: torch.device, nbytes: int = 1 << 28, repeats: int = 20) -> float:
    """Memory bandwidth in bytes/s from the fastest ``x += y`` on tensors of ``nbytes`` (3 x nbytes moved).

    The fastest, not the median: background load only ever slows a pass down, and the floor is a bound.
    """
    x = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.zeros_like(x)
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        x.add_(y)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 3 * nbytes / min(times[1:])


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the model's sizes (1: BERT-base)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer (the first one timed apart)")
    parser.add_argument("--repeats", type=int, help="timed steps per optimizer (default: 7 on CPU, 100 on GPU)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="optimizers to run (default: all)")
    parser.add_argument("--no-reference-paths", action="store_true", help="skip our optimizers with foreach=False")
    parser.add_argument("--no-fused", action="store_true", help="skip our optimizers with fused=True")
    parser.add_argument("--block", type=int, default=2,
                        help="consecutive steps per turn of the alternation, the last one timed (default 2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="save the setup and the results as JSON")
    args = parser.parse_args(argv)
    repeats = args.repeats or (100 if args.device == "cuda" else 7)
    if repeats < 1 or args.warmup < 1 or args.block < 1:
        parser.error("--repeats, --warmup and --block must be >= 1")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(args.seed)
    named = []
    for name, shape in bert_base_shapes(args.scale):
        param = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device, dtype))
        param.grad = (torch.randn(shape, generator=generator) * 1e-3).to(device, dtype)
        named.append((name, param))
    numel = sum(p.numel() for _, p in named)
    machine = machine_description(device)
    print(f"machine: {machine}")
    print(f"parameters: {numel:,} values in {len(named)} tensors, {args.dtype} on {device}; "
          f"warmup {args.warmup}, repeats {repeats}, turns of {args.block} steps")

    factories = optimizer_factories(reference_paths=not args.no_reference_paths, fused_paths=not args.no_fused)
    unknown = sorted(set(args.only or []) - set(factories))
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; valid: {list(factories)}")
    reference = factories[REFERENCE](named)
    for _ in range(args.warmup):
        reference.step()

    results: dict[str, Result] = {}
    all_reference_times: list[float] = []
    for name in [n for n in args.only or factories if n != REFERENCE]:
        try:
            candidate = factories[name](named)
            candidate_times, reference_times, first_step = time_paired(candidate, reference, device, args.warmup, repeats,
                                                                       args.block)
            peak_extra = peak_extra_bytes(candidate, device)
        except RuntimeError as error:  # e.g. fused AdamW without a kernel for this device and dtype
            print(f"  {name}: skipped ({str(error).splitlines()[0]})")
            continue
        finally:
            candidate = None
            gc.collect()
        result = summarize(name, candidate_times)
        result.first_step_ms, result.peak_extra_mb = 1e3 * first_step, peak_extra / 1e6
        result.reference_ms = 1e3 * statistics.median(reference_times)
        result.ratio = result.median_ms / result.reference_ms
        results[name] = result
        all_reference_times += reference_times
        print(f"  {name}: {result.median_ms:.1f} ms, {result.ratio:.2f} x AdamW-foreach", flush=True)
    if not all_reference_times:  # nothing but the reference asked for
        all_reference_times = [timed_step(reference, device) for _ in range(repeats)]
    reference_result = summarize(REFERENCE, all_reference_times)
    reference_result.reference_ms, reference_result.ratio = reference_result.median_ms, 1.0
    results = {REFERENCE: reference_result, **results}
    if FUSED_ADAMW in results:
        for result in results.values():
            result.ratio_to_fused_adamw = result.median_ms / results[FUSED_ADAMW].median_ms

    bandwidth = add_bandwidth(device)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    floor_ms = 1e3 * 7 * element_bytes * numel / bandwidth

    width = max(len(name) for name in results)
    print(f"\n{'optimizer':<{width}}  {'median ms':>10}  {'IQR ms':>8}  {'x AdamW-foreach':>15}  {'x AdamW-fused':>13}"
          f"  {'first step ms':>13}  {'peak extra MB':>13}")
    for r in results.values():
        print(f"{r.name:<{width}}  {r.median_ms:>10.1f}  {r.iqr_ms:>8.1f}  {r.ratio:>15.2f}  {r.ratio_to_fused_adamw:>13.2f}"
              f"  {r.first_step_ms:>13.1f}  {r.peak_extra_mb:>13.1f}")
    fused_ms = results[FUSED_ADAMW].median_ms if FUSED_ADAMW in results else math.nan
    print(f"{'byte floor (AdamW)':<{width}}  {floor_ms:>10.1f}  {'':>8}  {floor_ms / reference_result.median_ms:>15.2f}"
          f"  {floor_ms / fused_ms:>13.2f}")
    print(f"ratios: median step / median of the AdamW-foreach steps alternated with it (AdamW-foreach row: all its steps);\n"
          f"median step / median of the AdamW-fused steps (its row, not alternated).\n"
          f"byte floor = 7 x {element_bytes} B x {numel:,} values / {bandwidth / 1e9:.1f} GB/s "
          "(bandwidth: 3 x 256 MiB / fastest in-place add x += y)")

    if args.json:
        with open(args.json, "w") as out:
            json.dump({
                "machine": machine, "device": str(device), "dtype": args.dtype, "scale": args.scale,
                "parameters": numel, "tensors": len(named), "warmup": args.warmup, "repeats": repeats, "block": args.block,
                "bandwidth_bytes_per_s": bandwidth, "byte_floor_ms": floor_ms,
                "results": [asdict(result) for result in results.values()],
            }, out, indent=2)
    return list(results.values())


if __name__ == "__main__":
    main()
