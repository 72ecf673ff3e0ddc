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


# Every earlier default: 1-D tensors excluded (the first sweep), MCLR without the EMA and CBLR
# with it (ρ = 0.5) and without a bound (the ×√2 screen), MCLR bounded at 1 and CBLR at 2
# (the transfer protocol).
_OLD = [(LARS, dict(exclude_1d=True, max_ratio=None)),
        (MCLR, dict(exclude_1d=True, max_ratio=None, curvature_ema=0.0)),
        (CBLR, dict(exclude_1d=True, max_ratio=None, curvature_ema=0.5)),
        (MCLR, dict(exclude_1d=False, max_ratio=1.0, curvature_ema=0.5)),
        (CBLR, dict(exclude_1d=True, max_ratio=2.0, curvature_ema=0.0))]


@pytest.mark.parametrize("cls, old", _OLD)
def test_old_defaults_stay_reachable(cls, old):
    model = _model()
    opt = cls(model.parameters(), **old)
    assert all(opt.defaults[k] == v for k, v in old.items())
    opt = cls(model.parameters(), exclude_1d=False)
    assert opt.defaults["exclude_1d"] is False


def test_rule_defaults_table():
    assert {rule: (d["exclude_1d"], d["max_ratio"], d["curvature_ema"]) for rule, d in RULE_DEFAULTS.items()} == {
        "lars": (False, None, 0.0), "mclr": (False, 0.25, 0.5), "cblr": (True, 1.0, 0.0)}


def _run(cls, steps, power=2, **options):
    """``steps`` steps on 0.05·Σ w_i^power; power 2: curvature 0.1, so CBLR's r = η/κ = 10
    unbounded; power 4: MCLR's quotients |g_i|/|w_i| = 0.2·w_i² shrink with w."""
    w = torch.nn.Parameter(torch.linspace(0.5, 2.0, 16).reshape(4, 4))
    opt = cls([w], lr=0.1, backend="reference", **options)

    def closure():
        opt.zero_grad()
        loss = 0.05 * w.pow(power).sum()
        loss.backward()
        return loss
    ratios = []
    for _ in range(steps):
        opt.step(closure)
        ratios.append(opt.layer_stats()["0.0"]["ratio"])
    return w.detach(), ratios


def test_cblr_ratio_is_bounded_by_one_by_default():
    _, unbounded = _run(CBLR, 3, max_ratio=None)
    assert unbounded[-1] == pytest.approx(10.0, rel=1e-4)     # η/κ̄ with κ̄ = c once measured
    _, bounded = _run(CBLR, 3)
    assert bounded[-1] == 1.0


def test_mclr_curvature_ema_is_a_half_by_default():
    default, _ = _run(MCLR, 4, power=4)
    explicit, _ = _run(MCLR, 4, power=4, curvature_ema=0.5)
    without, _ = _run(MCLR, 4, power=4, curvature_ema=0.0)
    assert torch.equal(default, explicit) and not torch.equal(default, without)
