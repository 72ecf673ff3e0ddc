"""The defaults of each rule (docs/algorithm.md, "Defaults"; measured in docs/experiments.md):
which layers are adapted, and that every old behaviour stays reachable by passing it."""
import math

import pytest
import torch

from cblr_ext import CBLR, LARS, MCLR
from cblr_ext.hyperparams import RULE_DEFAULTS


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _step(opt, model):
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss
    opt.step(closure)
    return opt.layer_stats()


@pytest.mark.parametrize("cls, bias_adapted", [(LARS, True), (MCLR, True), (CBLR, False)])
def test_which_layers_are_adapted_by_default(cls, bias_adapted):
    model = _model()
    opt = cls(model.named_parameters(), lr=0.1, backend="reference")
    assert opt.defaults["exclude_1d"] is not bias_adapted
    stats = _step(opt, model)
    if cls is CBLR:       # CBLR's first step has no previous step to measure along: fallback
        stats = _step(opt, model)
    assert not math.isnan(stats["0.weight"]["kappa"])
    for bias in ("0.bias", "2.bias"):
        # a not-adapted layer takes r = 1 and reports no κ; an adapted one its rule's r
        assert (stats[bias]["ratio"] != 1.0) is bias_adapted
        assert (not math.isnan(stats[bias]["kappa"])) is bias_adapted


def test_lars_bias_ratio_is_the_lars_formula():
    """An adapted bias under LARS: r = η‖b‖/(‖g‖ + β‖b‖ + ε), computed here from the tensors."""
    model = _model()
    opt = LARS(model.named_parameters(), lr=0.1, weight_decay=0.01, backend="reference")
    b = model[0].bias.detach().clone()
    stats = _step(opt, model)
    g = model[0].bias.grad
    expected = 1e-3 * b.norm() / (g.norm() + 0.01 * b.norm() + 1e-8)
    assert stats["0.bias"]["ratio"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("cls", [LARS, MCLR, CBLR])
def test_old_defaults_stay_reachable(cls):
    model = _model()
    opt = cls(model.parameters(), exclude_1d=True, max_ratio=None)
    assert opt.defaults["exclude_1d"] is True and opt.defaults["max_ratio"] is None
    opt = cls(model.parameters(), exclude_1d=False)
    assert opt.defaults["exclude_1d"] is False


def test_rule_defaults_table():
    assert {rule: (d["exclude_1d"], d["max_ratio"]) for rule, d in RULE_DEFAULTS.items()} == {
        "lars": (False, None), "mclr": (False, 1.0), "cblr": (True, None)}
