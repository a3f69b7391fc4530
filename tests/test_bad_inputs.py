"""Bad input gets a clear error naming the argument and its valid values, at construction, never a wrong run
(issue 10: the cases fixed so far)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hf_cblr import CBLR, create_optimizer, list_optimizers
from hf_cblr.integrations.transformers import parse_optim_args
from hf_cblr.optim.config import CBLRConfig
from hf_cblr.trainer import CBLRTrainingArguments
from hf_cblr.trainer.batch_schedule import parse_batch_size_schedule


@pytest.mark.parametrize("name", list_optimizers())
def test_complex_parameters_are_refused_at_construction(name: str) -> None:
    """A real cast would erase their imaginary part: refused, naming the parameter's dtype and the fix."""
    with pytest.raises(TypeError, match=r"complex parameters .*complex64.* torch.view_as_real"):
        create_optimizer([nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64))], name)


@pytest.mark.parametrize("seed", ["abc", None, 1.5, True, -1])
def test_seed_must_be_a_non_negative_integer(seed: object) -> None:
    with pytest.raises(TypeError if not isinstance(seed, int) or isinstance(seed, bool) else ValueError,
                       match=r"seed must be an integer >= 0"):
        CBLRConfig(seed=seed)


def test_numpy_scalars_are_accepted_as_numbers() -> None:
    optimizer = CBLR([nn.Parameter(torch.zeros(2, 2))], lr=np.float32(0.25), trust=np.float64(0.5),
                     update_interval=np.int64(1), seed=np.int64(3))
    assert optimizer.param_groups[0]["lr"] == 0.25 and optimizer.param_groups[0]["trust"] == 0.5
    assert optimizer.estimator.seed == 3


def test_a_nan_in_optim_args_names_its_key() -> None:
    with pytest.raises(ValueError, match=r"optim_args trust=nan: the value is NaN"):
        parse_optim_args("curvature=secant,trust=nan")


def test_a_huge_list_schedule_is_refused_at_parse_time() -> None:
    with pytest.raises(ValueError, match=r"lists 10000000001 steps; at most 1000000"):
        parse_batch_size_schedule("list:8*10000000000,16")


def test_negative_weight_decay_fails_at_argument_time(tmp_path: object) -> None:
    with pytest.raises(ValueError, match=r"weight_decay must be in \[0.0, inf\), got -1.0"):
        CBLRTrainingArguments(output_dir=str(tmp_path), optim="cblr", weight_decay=-1.0, use_cpu=True, report_to=[])


@pytest.mark.parametrize("other", ["sgd", "adamw"])
def test_another_optimizers_state_is_refused_at_load(other: str) -> None:
    """torch's SGD or AdamW state loads into a CBLR only to fail at its first step: refused at load, saying so."""
    param = nn.Parameter(torch.ones(2, 2))
    foreign = torch.optim.SGD([param], lr=0.1, momentum=0.9) if other == "sgd" else torch.optim.AdamW([param])
    param.grad = torch.ones(2, 2)
    foreign.step()
    optimizer = CBLR([param], lr=0.1)
    with pytest.raises(ValueError, match=r"was not saved by an hf_cblr optimizer .*start the optimizer fresh"):
        optimizer.load_state_dict(foreign.state_dict())
