"""The single-process reference that the sharded-engine tests (ZeRO, FSDP2) compare their ranks' results with."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor

import hf_cblr


def single_process_run(worker: ModuleType, case: str, fused: bool | None = False,
                       ) -> tuple[dict[str, Tensor], dict[str, dict[str, float]], int]:
    """The parameters, layer statistics and optimizer state bytes of ``worker``'s ``case`` (its ``CASES``, ``STEPS``,
    ``build_model``, ``batch``, ``loss_fn`` and ``state_bytes``) trained in one process, without a sharding engine, on
    the kernels that the sharded ranks run (the fused and foreach kernels round differently): ``fused`` unless the case
    names its own (False: the foreach kernels of FSDP2's shards; None: the default, as ZeRO's ranks run it)."""
    name, kwargs = worker.CASES[case]
    model = worker.build_model()
    optimizer = hf_cblr.create_optimizer(model, name, **{"fused": fused, **kwargs})
    for step in range(worker.STEPS):
        inputs, targets = worker.batch(step)
        optimizer.zero_grad()
        worker.loss_fn(model(inputs), targets).backward()
        optimizer.step()
    parameters = {n: p.detach().clone() for n, p in model.named_parameters()}
    return parameters, optimizer.layer_stats(), worker.state_bytes(dict(optimizer.state))


def assert_matches(result: dict[str, Any], expected: tuple[dict[str, Tensor], dict[str, dict[str, float]], int]) -> None:
    """A sharded run's parameters (rtol 1e-5) and every per-layer statistic (rel 1e-5) equal the single-process run's."""
    expected_parameters, expected_stats, _ = expected
    torch.testing.assert_close(result["parameters"], expected_parameters, rtol=1e-5, atol=1e-6)
    assert result["layer_stats"].keys() == expected_stats.keys()
    for layer, stats in expected_stats.items():
        for key, value in stats.items():
            assert result["layer_stats"][layer][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (layer, key)
