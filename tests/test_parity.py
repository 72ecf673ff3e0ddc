"""Every backend on this machine against the reference, over the whole parity table
(tests/optim_db.py), through one scenario with torch's tricks: a skipped first step,
a gradient None at one step, a frozen layer, a zero-size parameter, and a state_dict
round trip mid-run that switches backend (there and back).
"""
import io

import pytest
import torch

import cblr_ext
from helpers import max_rel_diff
from optim_db import BACKEND_DTYPES, TOLERANCE, cases

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
    assert opt.skipped_steps == 1  # carried through the state_dict round trips
    return trajectory, calls


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(cases()), ids=lambda c: c[0])
def test_backend_follows_the_reference(case, dtype, backend):
    if dtype not in BACKEND_DTYPES[backend]:
        pytest.skip(f"the {backend} backend does not run {dtype}")
    _, info, kwargs = case
    ref, ref_calls = run(info.cls, kwargs, "reference", dtype, switch=False)
    got, got_calls = run(info.cls, kwargs, backend, dtype, switch=True)
    assert got_calls == ref_calls
    for t, (a, b) in enumerate(zip(ref, got)):
        if t == SKIPPED:
            for p0, p in zip(make_model(dtype)[0].parameters(), b):
                assert torch.equal(p0, p), "a skipped step changed a parameter"
        for i, (p, q) in enumerate(zip(a, b)):
            assert max_rel_diff(p, q) <= TOLERANCE[dtype], f"step {t}, parameter {i}"
