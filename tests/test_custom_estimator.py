"""A new curvature estimator, written here from the public interface of ``hf_cblr.optim`` alone, plugs in through
the registry (``curvature=<its name>``, also in ``optim_args``) and fine-tunes the tiny BERT through ``CBLRTrainer``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor
from workers.tiny import IndexedDataset, tiny_bert

from hf_cblr.integrations import find_optimizer
from hf_cblr.optim import (
    CURVATURE_ESTIMATORS,
    Closure,
    CurvatureEstimator,
    EstimateInput,
    StateKind,
    register_curvature_estimator,
)
from hf_cblr.trainer import CBLRTrainer, CBLRTrainingArguments


@register_curvature_estimator
class GradientGrowthCurvature(CurvatureEstimator):
    """``c = (1 + |g_t| / max_s<t |g_s|) / 2 + beta``: between 1/2 and 1 while the gradient shrinks, larger where it grows.

    Keeps one value per layer (the largest gradient norm so far), declared in its state schema.
    """

    name = "test_gradient_growth"
    state_schema: ClassVar[dict[str, StateKind]] = {"largest_grad_norm": StateKind.LAYER}

    def estimate(self, inputs: list[EstimateInput], closure: Closure | None, step: int) -> list[Tensor]:
        estimates = []
        for x in inputs:
            grad_norms = x.direction.grad_norms
            largest = torch.stack([state.get("largest_grad_norm", norm) for state, norm in zip(x.batch.states, grad_norms,
                                                                                                 strict=True)])
            largest = torch.maximum(largest, grad_norms)
            for state, value in zip(x.batch.states, largest, strict=True):
                state["largest_grad_norm"] = value.clone()
            estimates.append((1 + grad_norms / largest) / 2 + x.batch.decay)
        return estimates


def test_an_estimator_from_the_public_interface_trains_the_tiny_bert(tmp_path: Path) -> None:
    assert CURVATURE_ESTIMATORS["test_gradient_growth"] is GradientGrowthCurvature
    args = CBLRTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        optim="cblr_adam", optim_args="curvature=test_gradient_growth,rate_rule=inverse_curvature,trust=1.0", learning_rate=3e-3,
        per_device_train_batch_size=8, num_train_epochs=8, max_grad_norm=0.0, weight_decay=0.0,
    )
    dataset = IndexedDataset(24)
    trainer = CBLRTrainer(model=tiny_bert(), args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    optimizer = find_optimizer(trainer.optimizer)
    assert type(optimizer.estimator) is GradientGrowthCurvature
    adapted = [layer for layer in optimizer.layer_stats().values() if layer["rate"] != 1.0]
    assert adapted
    for layer in adapted:  # the rate is trust / c with c in [1/2, 1] (EMA of estimates in that range)
        assert 0.5 <= layer["curvature"] <= 1.0 + 1e-6
        assert math.isclose(layer["rate"], 1.0 / (layer["curvature"] + 1e-8), rel_tol=1e-5)
