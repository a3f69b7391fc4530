"""Shared fixtures: every (registry optimizer, curvature estimator) configuration, and a small regression problem."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from hf_cblr import MCLR, create_optimizer, get_optimizer_info, list_optimizers
from hf_cblr.optim import CURVATURE_ESTIMATORS


def pytest_configure(config: pytest.Config) -> None:
    # The suite's tensors are tiny: one intra-op thread. With more, OpenMP's barriers make a small
    # forward/backward about 100x slower on a CPU shared with other processes.
    torch.set_num_threads(1)


def _curvatures(name: str) -> list[str | None]:
    """The estimators the registry optimizer ``name`` takes (``None``: it has a fixed one, as LARS and LAMB)."""
    info = get_optimizer_info(name)
    if "curvature" not in info.valid_kwargs():
        return [None]
    return sorted(n for n, cls in CURVATURE_ESTIMATORS.items() if cls.elementwise or not issubclass(info.optimizer_class, MCLR))


@dataclass(frozen=True)
class OptimizerConfig:
    """One registry optimizer with one curvature estimator."""

    name: str
    curvature: str | None

    @property
    def id(self) -> str:
        return self.name if self.curvature is None else f"{self.name}-{self.curvature}"

    @property
    def needs_closure(self) -> bool:
        return self.curvature is not None and CURVATURE_ESTIMATORS[self.curvature].needs_closure

    def create(self, model_or_params: Any, **kwargs: Any) -> Optimizer:
        if self.curvature is not None:
            kwargs.setdefault("curvature", self.curvature)
        return create_optimizer(model_or_params, self.name, **kwargs)


OPTIMIZER_CONFIGS = [OptimizerConfig(name, curvature) for name in list_optimizers() for curvature in _curvatures(name)]


@pytest.fixture(params=OPTIMIZER_CONFIGS, ids=[config.id for config in OPTIMIZER_CONFIGS])
def optimizer_config(request: pytest.FixtureRequest) -> OptimizerConfig:
    """Each registry optimizer with each estimator it accepts."""
    return request.param


class Regression:
    """A small deterministic regression: a tanh MLP with biases and a LayerNorm, on fixed random data.

    ``step`` runs one training step, passing ``loss`` as the closure to the estimators that need one
    (it re-evaluates the loss of the same batch without calling backward).
    """

    def __init__(self, dtype: torch.dtype = torch.float32, seed: int = 0, hidden: int = 16) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.LayerNorm(hidden), nn.Linear(hidden, 3)).to(dtype)
        self.inputs = torch.randn(32, 6, generator=generator).to(dtype)
        self.targets = torch.randn(32, 3, generator=generator)

    def loss(self) -> Tensor:
        return nn.functional.mse_loss(self.model(self.inputs).float(), self.targets)

    def step(self, optimizer: Optimizer) -> float:
        optimizer.zero_grad()
        loss = self.loss()
        loss.backward()
        optimizer.step(self.loss if optimizer.estimator.needs_closure else None)
        return loss.item()

    def parameters(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


@pytest.fixture
def make_regression() -> Callable[..., Regression]:
    """Factory of :class:`Regression` problems: ``make_regression(dtype=..., seed=..., hidden=...)``."""
    return Regression
