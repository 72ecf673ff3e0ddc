"""LARS on the cpp backend takes Σw_t² from the previous update pass (reuse_weight_norm):
steps equal, bit for bit, those that read w again; an in-place change the version counter
sees makes pass 1 measure w again; a write through ``.data`` is not seen (the documented
contract), which also shows that the carried norm is the one in use."""
import math

import pytest
import torch

from cblr_ext import LARS, backends

# Indices 1 to 3 are large enough to be tracked (cpp._W_SQ_MIN_NUMEL); the others are read.
SHAPES = [(64, 3, 3, 3), (300, 301), (70001,), (3, 70001), (0, 5), (257,)]


@pytest.fixture(scope="module", autouse=True)
def cpp_backend():
    reason = backends.why_unavailable("cpp", "cpu")
    assert reason is None, f"the cpp backend must build and load here: {reason}"


def make_params(dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.05).to(dtype)) for s in SHAPES]


def set_grads(params, t):
    for i, p in enumerate(params):
        gen = torch.Generator().manual_seed(100 * t + i)
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(p.dtype)


def nan_equal(a: dict, b: dict) -> bool:
    """Equal layer_stats() (NaN equal to NaN)."""
    flat = [(x, y) for name in a for x, y in zip(a[name].values(), b[name].values())]
    return a.keys() == b.keys() and all(x == y or (x != x and y != y) for x, y in flat)


def fresh_norm(p):
    """‖w‖ in the math type, rounded to fp32 like the statistics."""
    return torch.linalg.vector_norm(p.detach().to(torch.promote_types(p.dtype, torch.float32))).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("extra", [{"momentum": 0.9, "weight_decay": 1e-4},
                                   {"momentum": 0.9, "nesterov": True, "curvature_interval": 2},
                                   {"exclude_1d": False}])
def test_reused_norm_steps_equal_fresh_ones(dtype, extra):
    runs = {}
    for reuse in (True, False):
        params = make_params(dtype)
        opt = LARS(params, lr=0.5, backend="cpp", reuse_weight_norm=reuse, **extra)
        stats = []
        for t in range(8):
            set_grads(params, t)
            if t == 3:
                params[1].grad[0, 0] = float("nan")  # skipped: w stays, so does its norm
            if t == 5:
                params[2].grad = None  # left out of one step
            opt.step()
            stats.append(opt.layer_stats())
        runs[reuse] = params, stats, opt.skipped_steps
    (reused, reused_stats, reused_skips), (fresh, fresh_stats, fresh_skips) = runs[True], runs[False]
    assert reused_skips == fresh_skips == 1
    for a, b in zip(reused, fresh):
        assert torch.equal(a, b)
    assert [nan_equal(a, b) for a, b in zip(reused_stats, fresh_stats)] == [True] * len(fresh_stats)


def test_in_place_change_between_steps_is_measured():
    params = make_params(torch.float32)
    opt = LARS(params, lr=0.5, momentum=0.9, backend="cpp")
    for t in range(2):
        set_grads(params, t)
        opt.step()
    with torch.no_grad():
        params[3].mul_(2.0)  # bumps the version counter
    params[1].data = params[1].detach() * 3.0  # other storage
    expected = [fresh_norm(params[1]), fresh_norm(params[3])]
    set_grads(params, 2)
    opt.step()
    stats = list(opt.layer_stats().values())
    assert [stats[1]["w_norm"], stats[3]["w_norm"]] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("reuse", [True, False])
def test_write_through_data_is_untracked(reuse):
    params = make_params(torch.float32)
    opt = LARS(params, lr=0.5, momentum=0.9, backend="cpp", reuse_weight_norm=reuse)
    set_grads(params, 0)
    opt.step()
    before = fresh_norm(params[1])
    params[1].data.mul_(2.0)  # .data has its own version counter
    after = fresh_norm(params[1])
    set_grads(params, 1)
    opt.step()
    seen = list(opt.layer_stats().values())[1]["w_norm"]
    assert seen == pytest.approx(before if reuse else after, rel=1e-6)
    assert not math.isclose(before, after, rel_tol=0.1)


@pytest.mark.parametrize("toggle", ["reuse_weight_norm", "lag"])
def test_a_step_that_carries_no_norm_makes_the_carried_one_stale(toggle):
    """A step taken without carrying ‖w‖ (reuse switched off for it, or lag=1 for it) still
    moves the parameters' version counters: the next step measures w again instead of
    taking the norm carried from before it.  Equal, bit for bit, to never reusing."""
    runs = {}
    for reuse in (True, False):
        params = make_params(torch.float32)
        opt = LARS(params, lr=0.5, backend="cpp", reuse_weight_norm=reuse, momentum=0.9)
        for t in range(5):
            set_grads(params, t)
            off = t in (1, 2)
            if toggle == "lag":
                opt.param_groups[0]["lag"] = 1 if off else 0
            else:
                opt.reuse_weight_norm = reuse and not off
            opt.step()
        runs[reuse] = [p.detach().clone() for p in params]
    assert all(torch.equal(a, b) for a, b in zip(runs[True], runs[False]))


def test_by_default_a_data_write_between_steps_is_seen():
    """The fast path is opt-in: by default pass 1 reads w, so ‖w‖ after a ``.data`` write is
    the true one (with reuse_weight_norm=True it would be the carried, stale one)."""
    params = make_params(torch.float32)
    opt = LARS(params, lr=0.5, momentum=0.9, backend="cpp")
    set_grads(params, 0)
    opt.step()
    for p in params:
        p.data.mul_(2)
    set_grads(params, 1)
    expected = [fresh_norm(p) for p in params]
    opt.step()
    got = [row["w_norm"] for row in opt.layer_stats().values()]
    assert got == pytest.approx(expected, rel=1e-6)
