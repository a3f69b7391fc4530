"""A tiny BERT, built from a config (no download), trains with every registry optimizer: its loss falls in 15 steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hf_cblr import create_optimizer, list_optimizers
from hf_cblr.optim import CURVATURE_ESTIMATORS

transformers = pytest.importorskip("transformers")

STEPS = 15

#: (registry name, curvature estimator or None for the optimizer's default, hyperparameters that train this model).
RUNS: list[tuple[str, str | None, dict[str, Any]]] = [
    ("cblr", None, dict(lr=0.1, trust=1.0)),
    ("cblr", "hvp", dict(lr=0.1, trust=1.0)),
    ("cblr_adam", None, dict(lr=0.01)),
    ("cblr_adam", "fd", dict(lr=0.03, trust=0.1)),
    ("lamb", None, dict(lr=0.03)),
    ("lars", None, dict(lr=1.0, trust_coefficient=0.02)),
    ("mclr", None, dict(lr=0.05, trust=10.0)),
    ("mclr_adam", None, dict(lr=0.01)),
]


def _tiny_bert(attn_implementation: str) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(config)


def test_every_registry_optimizer_is_covered() -> None:
    assert {name for name, _, _ in RUNS} == set(list_optimizers())


@pytest.mark.parametrize(("name", "curvature", "kwargs"), RUNS, ids=[f"{n}-{c}" if c else n for n, c, _ in RUNS])
def test_tiny_bert_loss_falls(name: str, curvature: str | None, kwargs: dict[str, Any]) -> None:
    needs_closure = curvature is not None and CURVATURE_ESTIMATORS[curvature].needs_closure
    # hvp needs a double backward, which the fused attention kernels (SDPA) do not have.
    model = _tiny_bert("eager" if curvature == "hvp" else "sdpa")
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 100, (32, 12), generator=generator)
    labels = (input_ids[:, 1] < 50).long()  # learnable: the label is a function of the second token

    def closure() -> torch.Tensor:
        return model(input_ids=input_ids, labels=labels).loss

    optimizer = create_optimizer(model, name, weight_decay=0.01, **kwargs, **({"curvature": curvature} if curvature else {}))
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        for half in (slice(0, 16), slice(16, 32)):  # two accumulated micro-batches: the denoised secant needs two
            (model(input_ids=input_ids[half], labels=labels[half]).loss / 2).backward()
        losses.append(closure().item())
        optimizer.step(closure if needs_closure else None)
    assert losses[-1] < 0.9 * losses[0], losses
    rates = [stats["rate"] for stats in optimizer.layer_stats().values()]
    assert len(rates) == len(list(model.parameters())) and any(rate != 1.0 for rate in rates)


def test_hvp_through_fused_attention_names_the_fix() -> None:
    model = _tiny_bert("sdpa")
    input_ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(0))

    def closure() -> torch.Tensor:
        return model(input_ids=input_ids, labels=torch.zeros(4, dtype=torch.long)).loss

    optimizer = create_optimizer(model, "cblr", curvature="hvp")
    closure().backward()
    with pytest.raises(RuntimeError, match=r"fused attention kernels .* Load the model with attn_implementation='eager'"):
        optimizer.step(closure)
