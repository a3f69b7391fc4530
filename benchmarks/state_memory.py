"""Optimizer-state bytes per parameter, measured on a BERT model built from a config (no download).

For each optimizer: build it on ``BertForSequenceClassification`` (BERT-base by default; ``--scale``
shrinks the hidden, intermediate, vocabulary and position sizes), take two steps on a random batch,
sum ``nbytes`` over every tensor in ``optimizer.state`` (moments, momentum buffers, previous
gradients, element samples and their indices, per-layer scalars), and divide by the number of
parameters. Param groups follow Hugging Face's ``Trainer`` (weight decay on tensors with
``ndim >= 2``). The closure estimators (``hvp``, ``fd``, ``hutchinson``) get a closure that
re-evaluates the batch's loss; the model uses eager attention so that ``hvp`` has a double backward.

Usage::

    python benchmarks/state_memory.py                 # BERT-base, about a minute on 2 CPU cores
    python benchmarks/state_memory.py --scale 0.25    # quicker
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from transformers import BertConfig, BertForSequenceClassification

import hf_cblr
from hf_cblr.optim.estimators import CURVATURE_ESTIMATORS

WEIGHT_DECAY = 0.01


def bert(scale: float, seed: int) -> nn.Module:
    """BERT-base ``BertForSequenceClassification`` (2 labels), its sizes multiplied by ``scale``; no dropout."""
    config = BertConfig()

    def sized(n: int) -> int:
        return max(config.num_attention_heads, round(n * scale))

    hidden = sized(config.hidden_size) // config.num_attention_heads * config.num_attention_heads
    config = BertConfig(
        hidden_size=hidden, intermediate_size=sized(config.intermediate_size), vocab_size=sized(config.vocab_size),
        max_position_embeddings=sized(config.max_position_embeddings), hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=2, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def torch_groups(model: nn.Module) -> list[dict[str, Any]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def optimizer_factories() -> dict[str, Callable[[nn.Module], Optimizer]]:
    """Name -> builder. Ours: every registered optimizer, and CBLR on each base with each estimator."""
    factories: dict[str, Callable[[nn.Module], Optimizer]] = {
        "torch AdamW": lambda model: torch.optim.AdamW(torch_groups(model), lr=1e-5),
        "torch SGD momentum": lambda model: torch.optim.SGD(torch_groups(model), lr=1e-5, momentum=0.9),
    }
    for name in ("cblr", "cblr_adam"):
        for curvature in sorted(CURVATURE_ESTIMATORS):
            factories[f"{name} {curvature}"] = (lambda model, name=name, curvature=curvature: hf_cblr.create_optimizer(
                model, name, lr=1e-5, weight_decay=WEIGHT_DECAY, curvature=curvature))
    for name in ("mclr", "mclr_adam", "lars", "lamb"):
        factories[name] = lambda model, name=name: hf_cblr.create_optimizer(model, name, lr=1e-5, weight_decay=WEIGHT_DECAY)
    return factories


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes of every tensor held in ``optimizer.state`` on this rank, nested ones included (under DeepSpeed ZeRO the
    per-layer scalars are vectors in a dict of the partition's state; of a DTensor, its local shard)."""
    return _tensor_bytes(list(optimizer.state.values()))


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, DTensor):
        value = value.to_local()
    if isinstance(value, Tensor):
        return value.nbytes
    if isinstance(value, dict):
        value = list(value.values())
    return sum(_tensor_bytes(item) for item in value) if isinstance(value, (list, tuple)) else 0


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the model's sizes (1: BERT-base)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="save the results as JSON")
    args = parser.parse_args(argv)

    model = bert(args.scale, args.seed)
    numel = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(args.seed)
    batch = {
        "input_ids": torch.randint(0, model.config.vocab_size, (2, 16), generator=generator),
        "labels": torch.randint(0, 2, (2,), generator=generator),
    }
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    print(f"model: BertForSequenceClassification, {numel:,} parameters in {len(initial)} tensors (fp32)")

    def closure() -> Tensor:
        return model(**batch).loss

    results: dict[str, int] = {}
    for name, factory in optimizer_factories().items():
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                param.copy_(initial[param_name])
        optimizer = factory(model)
        needs_closure = getattr(getattr(optimizer, "estimator", None), "needs_closure", False)
        for _ in range(args.steps):
            optimizer.zero_grad()
            closure().backward()
            optimizer.step(closure if needs_closure else None)
        results[name] = state_bytes(optimizer)
        print(f"  {name}: {results[name] / numel:.2f} B/param", flush=True)

    width = max(len(name) for name in results)
    print(f"\n{'optimizer':<{width}}  {'state bytes / parameter':>23}  {'state MiB':>9}")
    for name, nbytes in results.items():
        print(f"{name:<{width}}  {nbytes / numel:>23.2f}  {nbytes / 2**20:>9.1f}")
    per_parameter = {name: nbytes / numel for name, nbytes in results.items()}
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"parameters": numel, "steps": args.steps, "state_bytes": results,
                       "bytes_per_parameter": per_parameter}, out, indent=2)
    return per_parameter


if __name__ == "__main__":
    main()
