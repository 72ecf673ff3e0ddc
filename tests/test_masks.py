"""``adapt_mask`` / ``decay_mask`` on every backend: the masked optimizer against the
reference optimizer given the same split as explicit param groups (``adapt=False``,
``weight_decay=0``), and its non-adapted, non-decayed layers against torch.optim.SGD."""
import copy
import re
from pathlib import Path

import pytest
import torch

import cblr_ext
from cblr_ext import CBLR, LAMB, LARS, MCLR

RULES = [LARS, MCLR, CBLR]
BACKENDS = cblr_ext.available_backends("cpu")
TOL = dict(rtol=1e-5, atol=1e-6)


def net(seed=0):
    """Linear, LayerNorm, ReLU, Linear: names 0.weight, 0.bias, 1.weight, 1.bias, 3.weight, 3.bias."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)) for _ in range(steps)]


def train(model, opts, data):
    """Steps of every optimizer in ``opts`` on one loss (each steps its own parameters)."""
    for x, y in data:
        def closure():
            for o in opts:
                o.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        closure()
        for o in opts:  # torch's SGD would re-run the closure after the others stepped
            o.step(None if isinstance(o, torch.optim.SGD) else closure)


def explicit_groups(model, parts):
    """``parts``: [(names, group options)] -> param groups of the named parameters."""
    params = dict(model.named_parameters())
    return [{"params": [params[n] for n in names], **options} for names, options in parts]


def assert_same(model, twin):
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m: f"{name}: {m}")


CASES = {
    # a set of names adapted; the norm's parameters not decayed (biases are)
    "names-and-callable": (dict(adapt_mask={"0.weight"}, decay_mask=lambda n, p: not n.startswith("1."),
                                exclude_1d=False),
                           [(["0.weight"], {}),
                            (["0.bias", "3.weight", "3.bias"], {"adapt": False}),
                            (["1.weight", "1.bias"], {"adapt": False, "weight_decay": 0.0})]),
    # the mask beside exclude_1d: 3.weight by the mask, the 1-D tensors by exclude_1d
    "beside-exclude_1d": (dict(adapt_mask=lambda n, p: n != "3.weight", exclude_1d=True),
                          [(["0.weight", "0.bias", "1.weight", "1.bias", "3.bias"], {}),
                           (["3.weight"], {"adapt": False})]),
    # decay alone: every layer adapted, the 1-D ones without weight decay
    "decay-only": (dict(decay_mask=lambda n, p: p.ndim > 1, exclude_1d=False),
                   [(["0.weight", "3.weight"], {}),
                    (["0.bias", "1.weight", "1.bias", "3.bias"], {"weight_decay": 0.0})]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", RULES)
def test_masks_step_as_the_reference_with_explicit_groups(cls, backend, case):
    options, parts = CASES[case]
    hp = dict(lr=0.05, momentum=0.9, weight_decay=0.1)
    model, twin, unmasked = net(), net(), net()
    opt = cls(model.named_parameters(), backend=backend, **hp, **options)
    exclude_1d = options["exclude_1d"]
    expected = cls(explicit_groups(twin, parts), backend="reference", exclude_1d=exclude_1d, **hp)
    plain = cls(unmasked.parameters(), backend=backend, exclude_1d=exclude_1d, **hp)
    data = batches(3)
    train(model, [opt], data)
    train(twin, [expected], data)
    train(unmasked, [plain], data)
    assert_same(model, twin)
    assert not all(torch.allclose(p, q, **TOL) for p, q in zip(model.parameters(), unmasked.parameters()))
    not_adapted = {n for names, o in parts if o.get("adapt") is False for n in names}
    stats = opt.layer_stats()
    assert {n for n, s in stats.items() if s["ratio"] == 1.0 and not s["fallback"]} >= not_adapted


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [LARS, MCLR])
def test_the_ssl_convention_steps_biases_and_norms_as_sgd_without_decay(cls, backend):
    """No adaptation, no decay for biases and norms: those layers take torch.optim.SGD's
    step (weight_decay 0) beside the reference optimizer stepping the weights."""
    weights = lambda name, p: p.ndim > 1  # noqa: E731
    model, twin = net(), net()
    opt = cls(model.named_parameters(), lr=0.05, momentum=0.9, weight_decay=0.1, adapt_mask=weights,
              decay_mask=weights, backend=backend)
    named = dict(twin.named_parameters())
    rest = [named[n] for n in named if named[n].ndim <= 1]
    lars = cls([named["0.weight"], named["3.weight"]], lr=0.05, momentum=0.9, weight_decay=0.1, backend="reference")
    sgd = torch.optim.SGD(rest, lr=0.05, momentum=0.9, weight_decay=0.0)
    data = batches(3)
    train(model, [opt], data)
    train(twin, [lars, sgd], data)
    assert_same(model, twin)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scheduler_writing_weight_decay_leaves_masked_layers_undecayed(backend):
    model, twin = net(), net()
    opt = LARS(model.named_parameters(), lr=0.05, weight_decay=0.1, decay_mask=lambda n, p: p.ndim > 1,
               backend=backend)
    expected = LARS(explicit_groups(twin, [(["0.weight", "3.weight"], {}),
                                           (["0.bias", "1.weight", "1.bias", "3.bias"], {"weight_decay": 0.0})]),
                    lr=0.05, weight_decay=0.1, backend="reference")
    for group in opt.param_groups:  # a schedule that writes every group
        group["weight_decay"] = 0.5
    expected.param_groups[0]["weight_decay"] = 0.5
    data = batches(2)
    train(model, [opt], data)
    train(twin, [expected], data)
    assert_same(model, twin)


@pytest.mark.parametrize("cls", RULES)
def test_masks_split_each_group_in_order_and_apply_to_added_groups(cls):
    model = net()
    named = list(model.named_parameters())
    opt = cls([{"params": named[:2], "lr": 0.1}], adapt_mask=lambda n, p: p.ndim > 1, decay_mask={"0.weight"})
    assert [g["param_names"] for g in opt.param_groups] == [["0.weight"], ["0.bias"]]
    assert [(g["adapt"], g.get("decay", True), g["lr"]) for g in opt.param_groups] == [(True, True, 0.1),
                                                                                       (False, False, 0.1)]
    opt.add_param_group({"params": named[2:], "adapt": False})  # a group's own adapt=False stays
    assert [g["param_names"] for g in opt.param_groups[2:]] == [["1.weight", "1.bias", "3.bias"], ["3.weight"]]
    assert [(g["adapt"], g.get("decay", True)) for g in opt.param_groups[2:]] == [(False, False), (False, False)]


@pytest.mark.parametrize("cls", RULES)
def test_masked_optimizer_round_trips_and_resumes_identically(cls):
    model, twin = net(), net()
    masks = dict(adapt_mask=lambda n, p: p.ndim > 1, decay_mask={"0.weight", "3.weight"})
    opt = cls(model.named_parameters(), lr=0.05, momentum=0.9, weight_decay=0.1, backend="reference", **masks)
    train(model, [opt], batches(2))
    twin.load_state_dict(model.state_dict())
    resumed = cls(twin.named_parameters(), lr=0.05, momentum=0.9, weight_decay=0.1, backend="reference", **masks)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    copied = copy.deepcopy(opt)
    assert copied._decay_mask.names == {"0.weight", "3.weight"}
    data = batches(2, seed=7)
    train(model, [opt], data)
    train(twin, [resumed], data)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_lamb_masks_step_as_explicit_groups():
    """LAMB: a decay-masked layer keeps its adaptation (apex's rule reads the group's
    weight_decay, not the masked one): the explicit twin says so with nvlamb."""
    model, twin = net(), net()
    opt = LAMB(model.named_parameters(), lr=1e-2, weight_decay=0.05, adapt_mask={"0.weight", "1.weight"},
               decay_mask=lambda n, p: n.endswith("weight"))
    expected = LAMB(explicit_groups(twin, [(["0.weight", "1.weight"], {}),
                                           (["0.bias", "1.bias"], {"weight_decay": 0.0, "adapt": False}),
                                           (["3.weight"], {"adapt": False}),
                                           (["3.bias"], {"weight_decay": 0.0, "adapt": False})]),
                    lr=1e-2, weight_decay=0.05, backend="reference")
    data = batches(3)
    train(model, [opt], data)
    train(twin, [expected], data)
    assert_same(model, twin)
    ratios = {n: s["ratio"] for n, s in opt.layer_stats().items()}
    assert ratios["0.bias"] == ratios["3.weight"] == 1.0 and ratios["0.weight"] != 1.0


def test_a_decay_masked_lamb_layer_is_adapted_as_nvlamb_at_zero_decay():
    model, twin = net(), net()
    opt = LAMB(model.named_parameters(), lr=1e-2, weight_decay=0.05, decay_mask=lambda n, p: p.ndim > 1)
    expected = LAMB(explicit_groups(twin, [(["0.weight", "3.weight"], {}),
                                           (["0.bias", "1.weight", "1.bias", "3.bias"],
                                            {"weight_decay": 0.0, "nvlamb": True})]),
                    lr=1e-2, weight_decay=0.05, backend="reference")
    data = batches(3)
    train(model, [opt], data)
    train(twin, [expected], data)
    assert_same(model, twin)


@pytest.mark.parametrize("cls", [*RULES, LAMB])
def test_mask_errors_are_clear(cls):
    with pytest.raises(ValueError, match=r"adapt_mask needs parameter names: .*named_parameters\(\)"):
        cls(net().parameters(), adapt_mask={"0.weight"})
    with pytest.raises(ValueError, match=r"decay_mask needs parameter names"):
        cls(net().parameters(), decay_mask=lambda n, p: True)
    with pytest.raises(ValueError, match=r"decay_mask names \['0.wieght'\]"):
        cls(net().named_parameters(), decay_mask={"0.wieght", "0.bias"})
    with pytest.raises(TypeError, match="adapt_mask must be a callable"):
        cls(net().named_parameters(), adapt_mask="0.weight")
    with pytest.raises(ValueError, match="option of the whole optimizer"):
        cls([{"params": net().named_parameters(), "adapt_mask": {"0.weight"}}])


def test_the_documented_ssl_example_runs_as_it_says():
    """docs/algorithm.md's example, run: weights adapted and decayed, the rest neither."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "algorithm.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "adapt_mask" in b)
    scope = {"LARS": LARS, "model": net()}
    exec(block, scope)
    split = [(g["param_names"], g["adapt"], g.get("decay", True)) for g in scope["opt"].param_groups]
    assert split == [(["0.weight", "3.weight"], True, True), (["0.bias", "1.weight", "1.bias", "3.bias"], False, False)]
