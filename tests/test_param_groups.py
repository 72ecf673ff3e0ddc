"""Every key of a param group, and every constructor argument, is honoured or refused with
an error naming it, at construction and in ``add_param_group`` (which then adds nothing);
torch.optim's options at the values implemented; torch's wording for torch's errors;
finite learning rates; floating parameters, each listed once."""
import copy
import math

import pytest
import torch

import cblr_ext
from cblr_ext import CBLR, LAMB, LARS, MCLR
from helpers import mlp

OPTIMIZERS = [LARS, MCLR, CBLR, LAMB]
BACKENDS = cblr_ext.available_backends("cpu")


def torch_sgd_message(**kwargs) -> str:
    with pytest.raises(ValueError) as caught:
        torch.optim.SGD(mlp().parameters(), **kwargs)
    return str(caught.value)


def refused(cls, group, match, error=ValueError):
    """``group`` is refused at construction and by add_param_group, which then adds nothing."""
    with pytest.raises(error, match=match):
        cls([group])
    model = mlp(1)
    opt = cls(model[0].parameters())
    before = list(opt.param_groups)
    group = {**group, "params": list(model[2].parameters())}
    with pytest.raises(error, match=match):
        opt.add_param_group(group)
    assert opt.param_groups == before


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("key, suggestion", [("lr_", "lr"), ("weight_deacy", "weight_decay"), ("Adapt", "adapt")])
def test_a_mistyped_group_key_is_refused_with_the_close_key(cls, key, suggestion):
    refused(cls, {"params": mlp().parameters(), key: 0.1},
            match=rf"unknown param group key '{key}' \(did you mean '{suggestion}'\?\)")


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_an_unknown_group_key_without_a_close_one_is_refused_naming_it(cls):
    refused(cls, {"params": mlp().parameters(), "zzz": 1}, match=r"unknown param group key 'zzz'; a group may hold")


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("key, value", [("dampening", 0.5), ("differentiable", True),
                                        ("foreach", True), ("fused", True)])
def test_torch_options_the_step_does_not_implement_are_refused(cls, key, value):
    if key == "dampening" and cls is LAMB:  # Adam has no dampening
        refused(cls, {"params": mlp().parameters(), key: value}, match="unknown param group key 'dampening'")
        return
    match = rf"{cls.__name__}: {key}={value!r} is not supported"
    refused(cls, {"params": mlp().parameters(), key: value}, match=match)
    with pytest.raises(ValueError, match=match):
        cls(mlp().parameters(), **{key: value})


@pytest.mark.parametrize("key", ["amsgrad", "capturable"])
def test_adams_options_lamb_does_not_implement_are_refused(key):
    refused(LAMB, {"params": mlp().parameters(), key: True}, match=rf"LAMB: {key}=True is not supported")
    with pytest.raises(ValueError, match=rf"{key}=True"):
        LAMB(mlp().parameters(), **{key: True})


@pytest.mark.parametrize("cls", [LARS, MCLR, CBLR])
def test_torch_options_at_the_implemented_values_step_as_without_them(cls):
    neutral = dict(dampening=0, differentiable=False, foreach=None, fused=False)
    model, twin = mlp(), mlp()
    opt = cls([{"params": model.parameters(), **neutral}], lr=0.1, momentum=0.9, backend="reference", **neutral)
    plain = cls(twin.parameters(), lr=0.1, momentum=0.9, backend="reference")
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
        for net, o in ((model, opt), (twin, plain)):
            def closure(net=net, o=o):
                o.zero_grad()
                loss = torch.nn.functional.mse_loss(net(x), y)
                loss.backward()
                return loss
            o.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("cls, key", [(LARS, "master_weights"), (MCLR, "skip_nonfinite"),
                                      (CBLR, "reuse_weight_norm"), (LAMB, "skip_nonfinite")])
def test_options_of_the_whole_optimizer_are_refused_in_a_group(cls, key):
    refused(cls, {"params": mlp().parameters(), key: True},
            match=rf"'{key}' is an option of the whole optimizer, not of a param group")


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_mistyped_constructor_argument_is_refused_naming_it(cls):
    with pytest.raises(TypeError, match="lr_"):
        cls(mlp().parameters(), lr_=0.1)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("key", ["decay", "maximize"])
def test_boolean_keys_must_be_bools(cls, key):
    refused(cls, {"params": mlp().parameters(), key: 1}, match=rf"Invalid {key}: 1 \(must be a bool\)")


# ------------------------------------------------------------ maximize

def steps(models, opt, signs, n=3):
    """``n`` closure steps on Σ sign × MSE loss of each model, on seeded batches."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(n):
        x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)

        def closure():
            opt.zero_grad()
            loss = sum(sign * torch.nn.functional.mse_loss(m(x), y) for m, sign in zip(models, signs))
            loss.backward()
            return loss
        opt.step(closure)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [LARS, MCLR, CBLR])
def test_maximize_steps_as_minimizing_the_negated_objective(cls, backend):
    """Group 0 maximizes f₀ beside group 1 minimizing f₁, as a twin minimizing −f₀ + f₁:
    bit-equal (the gradients of −f₀ are exactly −g₀)."""
    hp = dict(lr=0.1, momentum=0.9, weight_decay=0.01, backend=backend)
    nets, twins = (mlp(0), mlp(1)), (mlp(0), mlp(1))
    opt = cls([{"params": nets[0].parameters(), "maximize": True}, {"params": nets[1].parameters()}], **hp)
    twin_opt = cls([{"params": twins[0].parameters()}, {"params": twins[1].parameters()}], **hp)
    steps(nets, opt, (1.0, 1.0))
    steps(twins, twin_opt, (-1.0, 1.0))
    for net, twin in zip(nets, twins):
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))
    assert [g["maximize"] for g in opt.param_groups] == [True, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_maximize_without_adaptation_equals_torch_sgd_maximize(backend):
    model, twin = mlp(), mlp()
    opt = LARS(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01, adapt=False, maximize=True,
               backend=backend)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01, maximize=True)
    steps([model], opt, [1.0])
    steps([twin], sgd, [1.0])
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_lamb_maximize_steps_as_minimizing_the_negated_objective():
    model, twin = mlp(), mlp()
    steps([model], LAMB(model.parameters(), lr=1e-2, maximize=True), [-1.0])
    steps([twin], LAMB(twin.parameters(), lr=1e-2), [1.0])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


# ------------------------------------------------------------ torch's wording

@pytest.mark.parametrize("cls", [LARS, MCLR, CBLR])
@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(momentum=-0.5), dict(weight_decay=-1)])
def test_errors_torch_also_raises_use_torchs_wording(cls, kwargs):
    expected = torch_sgd_message(**kwargs)
    with pytest.raises(ValueError) as caught:
        cls(mlp().parameters(), **kwargs)
    assert str(caught.value).startswith(expected), (str(caught.value), expected)


def test_lambs_learning_rate_error_uses_torchs_wording():
    with pytest.raises(ValueError, match=f"^{torch_sgd_message(lr=-1.0)}$"):
        LAMB(mlp().parameters(), lr=-1.0)


# ------------------------------------------------------------ learning rate

@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("lr", [math.inf, -math.inf, math.nan, torch.tensor(math.inf), torch.tensor(math.nan)],
                         ids=["inf", "-inf", "nan", "tensor-inf", "tensor-nan"])
def test_a_non_finite_learning_rate_is_refused_at_construction(cls, lr):
    with pytest.raises(ValueError, match=r"learning rate|lr must not be NaN"):
        cls(mlp().parameters(), lr=lr)


@pytest.mark.parametrize("cls", [LARS, MCLR, LAMB])
def test_a_learning_rate_set_to_inf_is_refused_before_the_step_modifies_anything(cls):
    model = mlp()
    opt = cls(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = math.inf
    with pytest.raises(ValueError, match="Invalid learning rate: inf"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and not opt.state


# ------------------------------------------------------------ parameters

@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_parameter_listed_twice_in_a_group_is_refused(cls):
    p, q = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="parameter 2 of the param group is parameter 0 again"):
        cls([p, q, p])
    opt = cls([q])
    with pytest.raises(ValueError, match="is parameter 0 again"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_parameter_in_two_groups_is_refused(cls):
    p, q = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="more than one parameter group"):
        cls([{"params": [p, q]}, {"params": [p]}])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [LARS, MCLR, CBLR])
def test_integer_parameters_are_refused_on_every_backend_before_any_state(cls, backend):
    ints = torch.zeros(4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="does not support torch.int64 parameters"):
        cls([ints], backend=backend)
    model = mlp()
    opt = cls(model.parameters(), lr=0.1, momentum=0.9, backend=backend)
    with pytest.raises(ValueError, match="does not support torch.int64 parameters"):
        opt.add_param_group({"params": [ints]})
    assert len(opt.param_groups) == 1 and not opt.state


def test_integer_parameters_are_refused_by_lamb():
    with pytest.raises(ValueError, match="LAMB does not support torch.int32 parameters"):
        LAMB([torch.zeros(3, dtype=torch.int32)])


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_checkpoint_from_before_maximize_loads_and_steps_as_minimizing(cls):
    model, twin = mlp(), mlp()
    opt = cls(model.parameters(), lr=1e-2)
    steps([model], opt, [1.0], n=1)
    old = copy.deepcopy(opt.state_dict())  # LAMB's loaded step count would alias the saved tensor
    for group in old["param_groups"]:
        del group["maximize"]
    twin.load_state_dict(model.state_dict())
    resumed = cls(twin.parameters(), lr=1e-2)
    resumed.load_state_dict(old)
    steps([model], opt, [1.0], n=2)
    steps([twin], resumed, [1.0], n=2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
