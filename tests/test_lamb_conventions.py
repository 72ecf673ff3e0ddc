"""LAMB's cases of the shared conventions (cblr_ext/layouts.py, cblr_ext/checkpoint.py) that
the conformance suite does not reach: strided views on the fused kernels for every rule
(CBLR's probe included) against the same parameters made contiguous, a skipped step on a
view, and checkpoints of CBLR's own state (κ̄, age, prev_step)."""
import copy
import pickle

import pytest
import torch

import cblr_ext
from cblr_ext import LAMB

FUSED = [b for b in ("cpp",) if b in cblr_ext.available_backends("cpu")]
VIEWS = {
    "last-dim slice": (lambda: torch.randn(6, 5, 3), lambda base: base[..., 1]),
    "narrowed": (lambda: torch.randn(6, 9), lambda base: base.narrow(1, 2, 5)),
}
HP = {"lars": {}, "mclr": dict(rule="mclr", trust_coefficient=0.02), "cblr": dict(rule="cblr")}


def closure_for(opt, weight, bias, scale=1.0):
    x = torch.linspace(-1, 1, 4 * 5).reshape(4, 5)

    def closure():
        opt.zero_grad()
        # A contiguous copy in the forward: the gradient does not depend on the weight's layout.
        loss = (torch.tanh(x @ weight.contiguous().t() + bias) - 0.5).square().sum() * scale
        loss.backward()
        return loss
    return closure


def run(weight, bias, backend, rule, steps=3):
    opt = LAMB([weight, bias], lr=0.05, weight_decay=0.01, backend=backend, **HP[rule])
    for _ in range(steps):
        opt.step(closure_for(opt, weight, bias))
    return opt


@pytest.mark.skipif(not FUSED, reason="the C++ extension is not built")
@pytest.mark.parametrize("kind", VIEWS)
@pytest.mark.parametrize("rule", HP)
def test_a_view_steps_bit_identically_to_its_contiguous_clone_on_the_cpp_kernels(rule, kind):
    make_base, view_of = VIEWS[kind]
    torch.manual_seed(0)
    base = make_base()
    covered = torch.zeros(base.shape, dtype=torch.bool)
    view_of(covered).fill_(True)
    before = base.clone()
    view = torch.nn.Parameter(view_of(base))
    assert not view.is_contiguous()
    clone = torch.nn.Parameter(view.detach().clone())
    biases = [torch.nn.Parameter(torch.full((6,), 0.1)) for _ in range(2)]
    opt, twin = run(view, biases[0], "cpp", rule), run(clone, biases[1], "cpp", rule)
    assert not torch.equal(view.detach(), view_of(before))  # it moved
    assert torch.equal(view.detach(), clone.detach())
    assert torch.equal(biases[0].detach(), biases[1].detach())
    for key in ("exp_avg", "exp_avg_sq", "step") + (("kappa", "age", "prev_step") if rule == "cblr" else ()):
        a, b = opt.state[view][key], twin.state[clone][key]
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), key
        assert a.is_contiguous()  # laid out like the dense copy the kernels update
    assert torch.equal(base[~covered], before[~covered])  # the rest of the base is untouched


@pytest.mark.skipif(not FUSED, reason="the C++ extension is not built")
@pytest.mark.parametrize("rule", HP)
def test_a_skipped_step_leaves_a_view_and_its_state_bit_identical(rule):
    torch.manual_seed(1)
    base = torch.randn(6, 5, 3)
    view = torch.nn.Parameter(base[..., 0])
    bias = torch.nn.Parameter(torch.full((6,), 0.1))
    opt = run(view, bias, "cpp", rule, steps=2)
    before = base.clone()
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.step(closure_for(opt, view, bias, scale=float("nan")))  # CBLR: shifts the view, restores it
    assert opt.skipped_steps == 1
    assert torch.equal(base, before)
    after = opt.state_dict()["state"]
    for pid, s in state.items():
        for key, t in s.items():
            assert torch.equal(after[pid][key].nan_to_num(), t.nan_to_num()), (pid, key)


def _cblr_after_two_steps():
    torch.manual_seed(2)
    model = torch.nn.Linear(5, 6)
    opt = LAMB(model.parameters(), lr=0.05, rule="cblr", backend="reference")
    for _ in range(2):
        opt.step(closure_for(opt, model.weight, model.bias))
    return model, opt


@pytest.mark.parametrize("key, bad", [("prev_step", torch.zeros(5, 6)), ("kappa", torch.zeros(1)),
                                      ("age", torch.zeros(2))])
def test_a_cblr_checkpoint_with_wrong_shaped_state_is_refused_before_anything_is_loaded(key, bad):
    model, opt = _cblr_after_two_steps()
    sd = copy.deepcopy(opt.state_dict())
    assert {"kappa", "age", "prev_step"} <= set(sd["state"][0])
    sd["state"][0][key] = bad
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=rf"state\['{key}'\] of parameter 0 has shape"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for pid, s in before["state"].items():
        for name, t in s.items():
            assert torch.equal(after["state"][pid][name].nan_to_num(), t.nan_to_num()), (pid, name)


def test_a_cblr_checkpoint_of_fp32_scalars_loads_them_as_the_kernels_take_them():
    """κ̄ becomes SCALAR_DTYPE (fp64) and the step count fp32, whatever the checkpoint holds;
    the moments keep their own dtype."""
    model, opt = _cblr_after_two_steps()
    sd = copy.deepcopy(opt.state_dict())
    for s in sd["state"].values():
        s["kappa"], s["step"] = s["kappa"].float(), s["step"].double()
    twin = LAMB(copy.deepcopy(model).parameters(), lr=0.05, rule="cblr", backend="reference")
    twin.load_state_dict(sd)
    for s, original in zip(twin.state.values(), opt.state.values()):
        assert s["kappa"].dtype == torch.float64 and s["step"].dtype == torch.float32
        assert s["exp_avg"].dtype == torch.float32
        assert float(s["step"]) == float(original["step"]) == 2.0


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_keeps_the_count_of_skipped_steps(how):
    model, opt = _cblr_after_two_steps()
    opt.step(closure_for(opt, model.weight, model.bias, scale=float("inf")))
    assert opt.skipped_steps == 1
    copied = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert copied.skipped_steps == 1
    assert "differentiable" not in copied.defaults
