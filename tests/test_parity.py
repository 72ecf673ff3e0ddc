"""Every backend on this machine against the reference, over the whole parity table
(tests/optim_db.py), through one scenario with torch's tricks: a skipped first step,
a gradient None at one step, a frozen layer, a zero-size parameter, and a state_dict
round trip mid-run that switches backend (there and back).  Where the table names an
independent implementation, every backend follows it too, over 20 steps.
"""
import io

import pytest
import torch

import cblr_ext
from helpers import max_rel_diff
from optim_db import BACKEND_DTYPES, TOLERANCE, cases, optim_db

FUSED = [b for b in cblr_ext.available_backends("cpu") if b != "reference"]
STEPS = 7
SKIPPED = 0        # an Inf in a gradient: the first step is skipped
GRAD_NONE = 3      # the second layer's weight has no gradient at this step
SWITCH = (3, 5)    # state_dict round trips after these steps: to the reference, and back


def make_model(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4),
                                torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(dtype)
    model[4].requires_grad_(False)  # frozen: never a gradient
    empty = torch.nn.Parameter(torch.zeros(0, 3, dtype=dtype))  # zero-size
    return model, empty


def run(cls, kwargs, backend, dtype, switch):
    """Parameters after every step and the closure calls of every step."""
    model, empty = make_model(dtype)
    params = [*model.parameters(), empty]

    def build(name, state=None):
        opt = cls(params, backend=name, **kwargs)
        if state is not None:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            buffer.seek(0)
            opt.load_state_dict(torch.load(buffer))
        return opt

    opt = build(backend)
    gen = torch.Generator().manual_seed(1)
    trajectory, calls = [], []
    for t in range(STEPS):
        x = torch.randn(16, 6, generator=gen).to(dtype)
        y = torch.randn(16, 3, generator=gen).to(dtype)
        count = [0]

        def closure():
            count[0] += 1
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
            loss.backward()
            empty.grad = torch.zeros_like(empty)
            if t == SKIPPED:
                model[0].weight.grad[0, 0] = float("inf")
            if t == GRAD_NONE:
                model[2].weight.grad = None
            return loss

        opt.step(closure)
        calls.append(count[0])
        trajectory.append([p.detach().clone() for p in params])
        if switch and t in SWITCH:
            opt = build("reference" if t == SWITCH[0] else backend, opt.state_dict())
    if not switch:  # whether a state_dict carries it over: tests/test_conformance.py
        assert opt.skipped_steps == 1
    return trajectory, calls


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(cases()), ids=lambda c: c[0])
def test_backend_follows_the_reference(case, dtype, backend):
    _, info, kwargs = case
    if backend not in info.backends:
        pytest.skip(f"{info.name} has no kernels in the {backend} backend")
    if dtype not in BACKEND_DTYPES[backend]:
        pytest.skip(f"the {backend} backend does not run {dtype}")
    ref, ref_calls = run(info.cls, kwargs, "reference", dtype, switch=False)
    got, got_calls = run(info.cls, kwargs, backend, dtype, switch=True)
    assert got_calls == ref_calls
    for t, (a, b) in enumerate(zip(ref, got)):
        if t == SKIPPED:
            for p0, p in zip(make_model(dtype)[0].parameters(), b):
                assert torch.equal(p0, p), "a skipped step changed a parameter"
        for i, (p, q) in enumerate(zip(a, b)):
            assert max_rel_diff(p, q) <= TOLERANCE[dtype], f"step {t}, parameter {i}"


INDEPENDENT_STEPS = 20


def run_independent(opt, params, model, lr_factor=None):
    """Parameters after each of 20 plain steps (no skipped step: the other implementation
    has none); ``lr_factor(t)`` rescales our learning rate at step t."""
    base_lr = opt.param_groups[0]["lr"]
    gen = torch.Generator().manual_seed(1)
    trajectory = []
    for t in range(1, INDEPENDENT_STEPS + 1):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
        if lr_factor is not None:
            for group in opt.param_groups:
                group["lr"] = base_lr * lr_factor(t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in optim_db if i.independent is not None])
def test_backend_follows_the_independent_implementation(info, backend):
    """Ours (the mapped variant) against the entry's independent implementation, fp32,
    ≤ 1e-6 relative after every step."""
    if backend != "reference" and backend not in info.backends:
        pytest.skip(f"{info.name} has no kernels in the {backend} backend")
    independent = info.independent
    model, empty = make_model(torch.float32)
    params = [*model.parameters(), empty]
    theirs = independent.build(params)
    want = run_independent(theirs, params, model)
    model, empty = make_model(torch.float32)
    params = [*model.parameters(), empty]
    ours = info.cls(params, backend=backend, **independent.ours)
    got = run_independent(ours, params, model, independent.lr_factor)
    for t, (a, b) in enumerate(zip(want, got), start=1):
        for i, (p, q) in enumerate(zip(a, b)):
            assert max_rel_diff(p, q) <= 1e-6, f"{independent.name}: step {t}, parameter {i}"
