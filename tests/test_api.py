"""The torch.optim contract: param groups, named params, schedulers, state_dict
resume in a fresh process, bad input, non-finite skipping, layer_stats, backends."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import cblr_ext
from cblr_ext import CBLR, LARS, MCLR, BackendUnavailable, backends
from cblr_ext.functional import SCALAR_DTYPE
from helpers import mlp, train

RULES = [LARS, MCLR, CBLR]


def snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], \
        {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(opt.state.values())}


def assert_unchanged(model, opt, snap):
    params, state = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for i, s in enumerate(opt.state.values()):
        for k, v in s.items():
            torch.testing.assert_close(v, state[i][k], rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------- param groups

@pytest.mark.parametrize("cls", RULES)
def test_param_groups_override_hyperparameters(cls):
    model = mlp()
    first, second = model[0], model[2]
    opt = cls([{"params": first.parameters()},
               {"params": second.parameters(), "lr": 0.0, "adapt": False, "trust_coefficient": 0.5}],
              lr=0.5, momentum=0.9, backend="reference")
    assert opt.param_groups[1]["trust_coefficient"] == 0.5
    frozen = [p.detach().clone() for p in second.parameters()]
    train(model, opt, 3)
    for p, q in zip(second.parameters(), frozen):
        assert torch.equal(p, q)  # lr 0 in that group
    stats = opt.layer_stats()
    assert stats["1.0"]["ratio"] == 1.0 and stats["1.0"]["alpha"] == 0.0
    assert stats["0.0"]["ratio"] != 1.0


def test_named_parameters_key_layer_stats_and_add_param_group():
    model = mlp()
    opt = MCLR([(f"in.{n}", p) for n, p in model[0].named_parameters()], lr=1.0, backend="reference")
    opt.add_param_group({"params": [(f"out.{n}", p) for n, p in model[2].named_parameters()], "lr": 2.0})
    train(model, opt, 1)
    stats = opt.layer_stats()
    assert set(stats) == {"in.weight", "in.bias", "out.weight", "out.bias"}
    assert opt.param_groups[1]["param_names"] == ["out.weight", "out.bias"]
    assert stats["out.weight"]["alpha"] == pytest.approx(2.0 * stats["out.weight"]["ratio"], rel=1e-6)


def test_named_parameters_from_a_model():
    model = mlp()
    opt = LARS(model.named_parameters(), lr=1.0, backend="reference")
    train(model, opt, 1)
    assert set(opt.layer_stats()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_params_without_grad_are_skipped_and_zero_element_tensors_work():
    w = torch.nn.Parameter(torch.randn(3, 3))
    frozen = torch.nn.Parameter(torch.randn(3, 3))
    empty = torch.nn.Parameter(torch.randn(0, 4))
    opt = MCLR([w, frozen, empty], lr=1.0, momentum=0.9, max_ratio=None, backend="reference")
    w.grad, empty.grad = torch.randn(3, 3), torch.randn(0, 4)
    before = frozen.detach().clone()
    opt.step()
    assert torch.equal(frozen, before) and frozen not in opt.state
    stats = opt.layer_stats()
    assert set(stats) == {"0.0", "0.2"}
    assert stats["0.2"]["ratio"] == 1.0 and stats["0.2"]["w_norm"] == 0.0


# --------------------------------------------------------------- schedulers

@pytest.mark.parametrize("cls", RULES)
def test_lr_scheduler_drives_alpha(cls):
    model = mlp()
    opt = cls(model.parameters(), lr=1.0, backend="reference")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for expected_lr in (1.0, 0.5, 0.25):
        train(model, opt, 1)
        for s in opt.layer_stats().values():
            assert s["alpha"] == pytest.approx(expected_lr * s["ratio"], rel=1e-6)
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.125


def test_tensor_lr():
    model, twin = mlp(), mlp()
    opt = LARS(model.parameters(), lr=torch.tensor(0.7), momentum=0.9, backend="reference")
    ref = LARS(twin.parameters(), lr=0.7, momentum=0.9, backend="reference")
    train(model, opt, 3)
    train(twin, ref, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------- state_dict resume

RESUME_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_api import mlp, train
    import cblr_ext
    ckpt = torch.load({path!r}, weights_only=False)
    model = mlp()
    model.load_state_dict(ckpt["model"])
    opt = getattr(cblr_ext, {cls!r})(model.parameters(), **ckpt["kwargs"])
    opt.load_state_dict(ckpt["opt"])
    train(model, opt, 4, seed=7)
    torch.save([p.detach() for p in model.parameters()], {out!r})
""")


@pytest.mark.parametrize("cls,kwargs", [
    (LARS, dict(lr=1.0, momentum=0.9, weight_decay=1e-3, curvature_interval=2, lag=1)),
    (MCLR, dict(lr=2.0, momentum=0.9, nesterov=True, curvature_ema=0.9)),
    (CBLR, dict(lr=0.1, momentum=0.0, curvature_interval=3)),
    (CBLR, dict(lr=0.1, momentum=0.9, nesterov=True)),
])
def test_state_dict_resume_in_a_fresh_process_is_bit_identical(tmp_path, cls, kwargs):
    kwargs = dict(kwargs, backend="reference")
    model = mlp()
    opt = cls(model.parameters(), **kwargs)
    train(model, opt, 4)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "kwargs": kwargs}, ckpt)
    train(model, opt, 4, seed=7)
    out = tmp_path / "resumed.pt"
    script = RESUME_SCRIPT.format(tests=os.path.dirname(__file__), path=str(ckpt), cls=cls.__name__,
                                  out=str(out))
    subprocess.run([sys.executable, "-c", script], check=True)
    for p, q in zip(model.parameters(), torch.load(out)):
        assert torch.equal(p, q)


def test_low_precision_state_stays_fp32_across_load():
    p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    opt = LARS([p], lr=1.0, momentum=0.9, backend="reference")
    p.grad = torch.randn(4, 4, dtype=torch.bfloat16)
    opt.step()
    sd = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = LARS([q], lr=1.0, momentum=0.9, backend="reference")
    opt2.load_state_dict(sd)
    assert opt2.state[q]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(opt2.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    assert opt2.state[q]["kappa"].dtype == SCALAR_DTYPE


def test_an_fp32_kappa_of_an_older_checkpoint_loads_as_the_scalar_dtype():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = LARS([p], lr=1.0, lag=1)
    p.grad = torch.randn(4, 4)
    opt.step()
    sd = opt.state_dict()
    for key in ("kappa", "lagged"):  # as checkpoints before the fp64 scalars held them
        sd["state"][0][key] = sd["state"][0][key].float()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = LARS([q], lr=1.0, lag=1)
    opt2.load_state_dict(sd)
    assert opt2.state[q]["kappa"].dtype == opt2.state[q]["lagged"].dtype == SCALAR_DTYPE
    q.grad = p.grad.clone()
    opt2.step()  # the fused backends would reject fp32 scalars
    assert torch.isfinite(q).all()


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("cls", RULES)
@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-1.0), "learning rate"), (dict(momentum=1.0), "momentum"), (dict(momentum=-0.1), "momentum"),
    (dict(weight_decay=-1e-4), "weight_decay"), (dict(trust_coefficient=0.0), "trust_coefficient"),
    (dict(fallback_trust=-1.0), "fallback_trust"), (dict(eps=-1e-8), "eps"),
    (dict(curvature_ema=1.0), "curvature_ema"), (dict(curvature_ema=-0.5), "curvature_ema"),
    (dict(max_ratio=0.0), "max_ratio"), (dict(curvature_interval=0), "curvature_interval"),
    (dict(curvature_interval=1.5), "curvature_interval"), (dict(nesterov=True), "nesterov"),
    (dict(backend="gpu"), "backend"), (dict(median="mean"), "median"), (dict(lag=2), "lag"),
])
def test_bad_hyperparameters_raise_naming_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(mlp().parameters(), **kwargs)


def test_lag_is_for_lars_and_mclr_only():
    with pytest.raises(ValueError, match="lag"):
        CBLR(mlp().parameters(), lag=1)


def test_bad_group_edit_is_caught_before_the_step_modifies_anything():
    model = mlp()
    opt = LARS(model.parameters(), lr=1.0, momentum=0.9, backend="reference")
    train(model, opt, 1)
    snap = snapshot(model, opt)
    opt.param_groups[0]["momentum"] = 1.5
    with pytest.raises(ValueError, match="momentum"):
        train(model, opt, 1)
    assert_unchanged(model, opt, snap)


def test_complex_parameters_are_rejected():
    with pytest.raises(ValueError, match="complex"):
        MCLR([torch.nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))])


def test_sparse_gradient_raises_before_anything_changes():
    model = mlp()
    opt = MCLR(model.parameters(), lr=1.0, momentum=0.9, backend="reference")
    train(model, opt, 1)
    snap = snapshot(model, opt)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    last = list(model.parameters())[-1]
    last.grad = last.grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(model, opt, snap)


def test_group_mixing_devices_raises_before_anything_changes():
    cpu = torch.nn.Parameter(torch.randn(2, 2))
    meta = torch.nn.Parameter(torch.empty(2, 2, device="meta"))
    opt = LARS([cpu, meta], lr=1.0, backend="reference")
    cpu.grad = torch.randn(2, 2)
    before = cpu.detach().clone()
    with pytest.raises(ValueError, match="mixes devices"):
        opt.step()
    assert torch.equal(cpu, before)


# --------------------------------------------------------- non-finite grads

@pytest.mark.parametrize("cls", RULES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_the_whole_step(cls, bad):
    model = mlp()
    opt = cls([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
              lr=0.5, momentum=0.9, backend="reference")
    train(model, opt, 2)
    snap = snapshot(model, opt)
    x = torch.randn(16, 4)

    def poisoned_closure():
        opt.zero_grad()
        model(x).sum().backward()
        model[2].bias.grad[0] = bad  # one element, in the last group
        return torch.tensor(0.0)
    opt.step(poisoned_closure)
    assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 1
    train(model, opt, 1)
    assert opt.skipped_steps == 1 and all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_gradient_is_applied_when_skipping_is_off():
    p = torch.nn.Parameter(torch.ones(2, 2))
    opt = LARS([p], lr=1.0, skip_nonfinite=False, backend="reference")
    p.grad = torch.tensor([[float("nan"), 1.0], [1.0, 1.0]])
    opt.step()
    assert torch.isnan(p).any() and opt.skipped_steps == 0


# --------------------------------------------------------------- layer_stats

def test_layer_stats_contents():
    model = mlp()
    opt = LARS(model.named_parameters(), lr=2.0, momentum=0.9, weight_decay=1e-3, eps=0.0,
               backend="reference")
    train(model, opt, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads_seen = {}

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(torch.ones(3, 4)), torch.zeros(3, 2))
        loss.backward()
        grads_seen.update({n: p.grad.clone() for n, p in model.named_parameters()})
        return loss
    opt.step(closure)
    stats = opt.layer_stats()
    for name, p in model.named_parameters():
        s = stats[name]
        assert set(s) == {"w_norm", "g_norm", "step_norm", "kappa", "ratio", "alpha", "fallback"}
        w, g = before[name], grads_seen[name]
        assert s["w_norm"] == pytest.approx(float(w.norm()), rel=1e-6)
        assert s["g_norm"] == pytest.approx(float(g.norm()), rel=1e-6)
        assert s["step_norm"] == pytest.approx(float((w - p.detach()).norm()), rel=1e-4)
        assert s["alpha"] == pytest.approx(2.0 * s["ratio"], rel=1e-6)
        # every layer adapted, the biases too (LARS's default since issue 21)
        kappa = (float(g.norm()) + 1e-3 * float(w.norm())) / float(w.norm())
        assert s["kappa"] == pytest.approx(kappa, rel=1e-5)
        assert s["ratio"] == pytest.approx(1e-3 / kappa, rel=1e-5)
        assert s["fallback"] is False


def test_layer_stats_stay_on_device_until_asked():
    model = mlp()
    opt = MCLR(model.parameters(), lr=1.0, backend="reference")
    train(model, opt, 1)
    (names, stats), = opt._stats
    assert isinstance(stats, torch.Tensor) and stats.shape == (4, 7)


# ------------------------------------------------------------------ backends

def test_unknown_backend_and_unbuilt_backend_errors():
    with pytest.raises(ValueError, match="backend"):
        LARS(mlp().parameters(), backend="fpga")
    model = mlp()
    opt = LARS(model.parameters(), backend="cuda")
    train_error = None
    try:
        train(model, opt, 1)
    except BackendUnavailable as exc:
        train_error = str(exc)
    assert train_error is not None and "'cuda'" in train_error


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(backends, "_AUTO_ORDER", {"cpu": ("cuda",)})
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_resolved", {})  # resolutions are cached per device type
    model = mlp()
    opt = LARS(model.parameters(), backend="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, 3)
    messages = [str(w.message) for w in caught if "reference" in str(w.message)]
    assert len(messages) == 1
    assert "reference" in cblr_ext.available_backends("cpu")


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_step_is_an_inplace_update_to_autograd(backend):
    """step() moves the version counters of what it writes, as torch's in-place ops do: a
    backward through a graph that saved the old weights raises instead of running on the
    new ones."""
    lin = torch.nn.Linear(4, 3)
    loss = (lin.weight ** 2).sum() + lin.bias.sum()  # saves the weight
    loss.backward(retain_graph=True)
    opt = LARS(lin.parameters(), lr=0.1, momentum=0.9, backend=backend)
    before = lin.weight._version
    opt.step()
    assert lin.weight._version > before
    assert opt.state[lin.weight]["momentum_buffer"]._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
