"""The typed settings (``hf_cblr.optim.config``): one validation path for the constructors, the registry and
``optim_args``, without building an optimizer."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from hf_cblr import CBLR, LAMB, LARS, MCLR
from hf_cblr.integrations.transformers import check_optimizer_arguments
from hf_cblr.optim import create_optimizer, get_optimizer_info
from hf_cblr.optim.config import DEFAULT_TRUST, CBLRConfig, GroupSettings


def test_defaults_resolve_trust_by_base_and_betas_to_a_tuple() -> None:
    assert CBLRConfig().trust == DEFAULT_TRUST["sgd"]
    assert CBLRConfig(base="adam").trust == DEFAULT_TRUST["adam"]
    assert CBLRConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(trust=math.nan), ValueError, r"trust must be in \(0.0, inf\), got nan"),
    (dict(curvature="newton"), ValueError, r"curvature='newton' is not a known estimator; valid values: \["),
    (dict(rate_rule="newton"), ValueError, r"rate_rule='newton' is not valid; valid values: \['inverse_curvature', 'median'\]"),
    (dict(base="rmsprop"), ValueError, r"base='rmsprop' is not valid; valid values: \['sgd', 'adam'\]"),
    (dict(update_interval=5), ValueError, "update_interval=5 applies to the closure estimators"),
    (dict(min_ratio=20.0), ValueError, r"min_ratio must be in \[0.0, 10.0\]"),
    (dict(adaptation_mask="yes"), TypeError, "adaptation_mask must be None"),
    (dict(partition_layout=object()), TypeError, "partition_layout must be None"),
])
def test_every_error_names_the_argument_and_its_valid_values(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        CBLRConfig(**kwargs)
    with pytest.raises(error, match=match):  # the constructor goes the same way
        CBLR([nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_the_registry_validates_without_an_optimizer() -> None:
    config = get_optimizer_info("lamb").config(trust_coefficient=0.5)
    assert (config.base, config.curvature, config.trust, config.curvature_ema) == ("adam", "weight_norm", 0.5, 0.0)
    with pytest.raises(ValueError, match=r"MCLR aggregates by the median"):
        get_optimizer_info("mclr_adam").config(aggregate="mean")
    with pytest.raises(TypeError, match=r"does not take argument\(s\) \['trust'\]"):
        get_optimizer_info("lars").config(trust=1.0)
    with pytest.raises(ValueError, match=r"optim_args for optim='cblr_adam': trust must be in"):
        check_optimizer_arguments("cblr_adam", {"trust": -1.0})


def test_an_optimizer_built_from_a_config_equals_one_built_from_keywords() -> None:
    param = nn.Parameter(torch.zeros(2, 2))
    from_config = CBLR([param], config=CBLRConfig(lr=0.5, base="adam", curvature="secant"))
    from_keywords = CBLR([param], lr=0.5, base="adam", curvature="secant")
    assert from_config.settings == from_keywords.settings
    assert from_config.param_groups[0]["trust"] == DEFAULT_TRUST["adam"]
    with pytest.raises(TypeError, match="not both"):
        CBLR([param], config=CBLRConfig(), lr=0.5)


def test_special_cases_map_their_arguments() -> None:
    param = nn.Parameter(torch.zeros(2, 2))
    assert LARS([param], trust_coefficient=0.02).settings.trust == 0.02
    assert LAMB([param]).settings.base == "adam"
    assert MCLR([param]).settings.curvature == "secant_elementwise"
    assert MCLR([param]).settings.rate_rule == "median"
    with pytest.raises(ValueError, match=r"MCLR normalizes by the median curvature: rate_rule='inverse_curvature'"):
        MCLR([param], rate_rule="inverse_curvature")


def _assert_step_alike(build_reference: Any, build_other: Any) -> None:
    """Two optimizers, each built on its own copy of a two-layer model, take the same steps bit for bit over 4 steps."""
    torch.manual_seed(0)
    weights = [torch.randn(6, 5), torch.randn(4, 6)]
    models = [[nn.Parameter(w.clone()) for w in weights] for _ in range(2)]
    optimizers = [build_reference(models[0]), build_other(models[1])]
    for _ in range(4):
        x = torch.randn(8, 5)
        for params, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad()
            (torch.tanh(x @ params[0].T) @ params[1].T).pow(2).mean().backward()
            optimizer.step()
    for reference, other in zip(*models, strict=True):
        torch.testing.assert_close(other, reference, rtol=0, atol=0)
    assert not torch.equal(models[0][0], weights[0])


def test_cblr_under_the_median_rule_is_mclr() -> None:
    """``rate_rule="median"`` makes CBLR's rates MCLR's: the same element-wise median curvature gives the same steps."""
    _assert_step_alike(lambda params: MCLR(params, lr=0.05, base="adam"),
                       lambda params: CBLR(params, lr=0.05, base="adam", trust=1.0, curvature="secant_elementwise",
                                           aggregate="median", rate_rule="median"))


def test_the_registrys_cblr_adam_steps_as_mclr_adam() -> None:
    """The registry's ``cblr_adam`` takes the estimator that measured best on the Adam base (``docs/study.md``, "The
    default of cblr_adam"): the median of element-wise secants under the median rule, MCLR-Adam's update; a caller's
    ``curvature`` still overrides it."""
    _assert_step_alike(lambda params: create_optimizer(params, "mclr_adam", lr=0.05),
                       lambda params: create_optimizer(params, "cblr_adam", lr=0.05))
    assert create_optimizer([nn.Parameter(torch.zeros(2, 2))], "cblr_adam", curvature="secant").settings.curvature == "secant"


def test_a_group_override_is_validated_when_the_group_is_added() -> None:
    optimizer = CBLR([nn.Parameter(torch.zeros(2, 2))], lr=0.1)
    with pytest.raises(ValueError, match=r"momentum must be in \[0.0, 1.0\)"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "momentum": 1.5})
    assert GroupSettings.of_group(optimizer.param_groups[0]).lr == 0.1
