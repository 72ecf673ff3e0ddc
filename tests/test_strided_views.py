"""Parameters that are strided views (a slice of the last dim, a transposed matrix, a
narrowed slice) step on every backend: where the kernels need dense memory the step runs
on a dense copy and writes it back into the view, bit-for-bit as the same backend steps a
contiguous clone, and the base tensor's other elements are untouched."""
import pytest
import torch

import cblr_ext
from cblr_ext import CBLR, LARS, MCLR, backends
from helpers import max_rel_diff
from optim_db import TOLERANCE

BACKENDS = cblr_ext.available_backends("cpu")
RULES = [LARS, MCLR, CBLR]
# Each a base tensor and the view of it that is the parameter: a (6, 5) weight.
VIEWS = {
    "last-dim slice": (lambda: torch.randn(6, 5, 3), lambda base: base[..., 1]),
    "transposed": (lambda: torch.randn(5, 6), lambda base: base.t()),
    "narrowed": (lambda: torch.randn(6, 9), lambda base: base.narrow(1, 2, 5)),
}


def make_view(kind, seed=0):
    """(base, the view parameter, the positions of base the view covers)."""
    make_base, view_of = VIEWS[kind]
    torch.manual_seed(seed)
    base = make_base()
    covered = torch.zeros(base.shape, dtype=torch.bool)
    view_of(covered).fill_(True)
    return base, torch.nn.Parameter(view_of(base)), covered


def closure_for(opt, weight, bias, nan=False):
    x = torch.linspace(-1, 1, 4 * 5).reshape(4, 5)

    def closure():
        opt.zero_grad()
        # The forward reads a contiguous copy: its gradient, and so the comparison with a
        # contiguous clone, does not depend on how matmul treats the strided view.
        loss = (torch.tanh(x @ weight.contiguous().t() + bias) - 0.5).square().sum()
        if nan:
            loss = loss * float("nan")
        loss.backward()
        return loss
    return closure


def run(cls, weight, bias, backend, steps=3):
    opt = cls([weight, bias], lr=0.1, momentum=0.9, backend=backend)
    for _ in range(steps):
        opt.step(closure_for(opt, weight, bias))
    return opt


@pytest.mark.parametrize("kind", VIEWS)
@pytest.mark.parametrize("cls", RULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_view_steps_as_its_contiguous_clone_and_the_reference(backend, cls, kind):
    base, view, covered = make_view(kind)
    before = base.clone()
    clone = torch.nn.Parameter(view.detach().clone())
    bias_of_view, bias_of_clone = (torch.nn.Parameter(torch.full((6,), 0.1)) for _ in range(2))
    opt = run(cls, view, bias_of_view, backend)
    twin = run(cls, clone, bias_of_clone, backend)
    assert not torch.equal(view.detach(), VIEWS[kind][1](before))  # it moved
    assert torch.equal(view.detach(), clone.detach()), max_rel_diff(clone, view)
    assert torch.equal(bias_of_view.detach(), bias_of_clone.detach())
    assert torch.equal(opt.state[view]["momentum_buffer"], twin.state[clone]["momentum_buffer"])
    assert torch.equal(base[~covered], before[~covered])  # the rest of the base is untouched
    reference = torch.nn.Parameter(VIEWS[kind][1](before).clone())
    run(cls, reference, torch.nn.Parameter(torch.full((6,), 0.1)), "reference")
    assert max_rel_diff(reference, view) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("cls", RULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_step_leaves_the_view_and_its_state_unchanged(backend, cls):
    base, view, _ = make_view("last-dim slice")
    bias = torch.nn.Parameter(torch.full((6,), 0.1))
    opt = run(cls, view, bias, backend, steps=2)
    before, momentum = base.clone(), opt.state[view]["momentum_buffer"].clone()
    opt.step(closure_for(opt, view, bias, nan=True))  # CBLR: shifts the view, then restores it
    assert opt.skipped_steps == 1
    assert torch.equal(base, before)
    assert torch.equal(opt.state[view]["momentum_buffer"], momentum)


@pytest.mark.parametrize("cls", RULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_of_a_view_parameter(backend, cls):
    _, view, _ = make_view("narrowed")
    bias = torch.nn.Parameter(torch.full((6,), 0.1))
    opt = run(cls, view, bias, backend, steps=2)
    _, resumed, _ = make_view("narrowed")
    resumed.data.copy_(view.detach())
    resumed_bias = torch.nn.Parameter(bias.detach().clone())
    other = cls([resumed, resumed_bias], lr=0.1, momentum=0.9, backend=backend)
    other.load_state_dict(opt.state_dict())
    for o, w, b in ((opt, view, bias), (other, resumed, resumed_bias)):
        o.step(closure_for(o, w, b))
    assert torch.equal(view.detach(), resumed.detach())
    assert torch.equal(opt.state[view]["momentum_buffer"], other.state[resumed]["momentum_buffer"])


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_auto_keeps_the_fused_backend_for_a_group_with_a_view():
    _, view, _ = make_view("last-dim slice")
    assert backends.for_params("auto", torch.device("cpu"), [view]).name == "cpp"
