"""Parameters that are strided views (a slice of the last dim, a transposed matrix, a
narrowed slice) step on every backend: where the kernels need dense memory the step runs
on a dense copy and writes it back into the view, bit-for-bit as the same backend steps a
contiguous clone, and the base tensor's other elements are untouched."""
import pytest
import torch

import cblr_ext
from cblr_ext import CBLR, LARS, MCLR, backends
from helpers import max_rel_diff
from optim_db import BACKEND_DTYPES, TOLERANCE

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


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_reuse_weight_norm_keeps_no_dense_copy_between_steps():
    """The carried Σw² is keyed by the tensor the kernels update: a view's dense copy, new
    each step, is not carried (nor kept alive), and the step is the clone's."""
    torch.manual_seed(0)
    base = torch.randn(256, 256, 2)  # a view of 65536 elements: large enough to be carried
    view = torch.nn.Parameter(base[..., 0])
    clone = torch.nn.Parameter(view.detach().clone())
    opts = [LARS([p], lr=0.5, momentum=0.9, backend="cpp", reuse_weight_norm=True) for p in (view, clone)]
    for step in range(3):
        for p, opt in zip((view, clone), opts):
            p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) + step)
            opt.step()
    assert torch.equal(view.detach(), clone.detach())
    carried = opts[0]._scratch.get("cpp.w_sq", {})
    assert all(key is view for key in carried)


@pytest.mark.parametrize("kind", ["last-dim slice", "transposed"])
@pytest.mark.parametrize("cls", RULES)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "reference" or torch.bfloat16 in BACKEND_DTYPES.get(b, ())])
def test_a_bf16_view_under_master_weights_steps_as_its_clone(backend, cls, kind):
    base, _, covered = make_view(kind)
    base = base.bfloat16()
    before = base.clone()
    view = torch.nn.Parameter(VIEWS[kind][1](base))
    clone = torch.nn.Parameter(view.detach().clone())
    biases = [torch.nn.Parameter(torch.full((6,), 0.1, dtype=torch.bfloat16)) for _ in range(2)]
    x = torch.linspace(-1, 1, 4 * 5, dtype=torch.bfloat16).reshape(4, 5)
    opts = [cls([w, b], lr=0.1, momentum=0.9, backend=backend, master_weights=True)
            for w, b in zip((view, clone), biases)]
    for _ in range(3):
        for w, b, opt in zip((view, clone), biases, opts):
            def closure(w=w, b=b, opt=opt):
                opt.zero_grad()
                loss = (torch.tanh(x @ w.contiguous().t() + b).float() - 0.5).square().sum()
                loss.backward()
                return loss
            opt.step(closure)
    assert not torch.equal(view.detach(), VIEWS[kind][1](before))
    assert torch.equal(view.detach(), clone.detach())
    assert torch.equal(opts[0].state[view]["master"], opts[1].state[clone]["master"])
    assert torch.equal(base[~covered], before[~covered])
