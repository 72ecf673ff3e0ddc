"""A steady-state step reads nothing on the host and copies nothing to the device, on
every backend, through the optimizer, the functional core and the ops (what a GPU
step needs to stay asynchronous and a CUDA graph to capture it), checked on the CPU
with ``HostTraffic`` (tests/host_traffic.py).  The GPU twins (sync debug mode, graph
capture) are in test_triton_backend.py, test_cuda_backend.py and test_compile.py."""
import pytest
import torch

from cblr_ext import CBLR, LARS, MCLR, backends
from host_traffic import HostTraffic

RULES = {"lars": LARS, "mclr": MCLR, "cblr": CBLR}
VARIANTS = {
    "momentum_wd": dict(momentum=0.9, weight_decay=1e-4),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "lag": dict(momentum=0.9, lag=1),
}
# "auto" is the op layer itself: torch.ops.cblr_ext, dispatched to the CPU kernels.
BACKENDS = ["auto", "reference", "cpp", "triton"]


def shapes():
    # a matrix, a conv weight, a bias (not adapted), a zero-element tensor
    return [(6, 7), (3, 2, 3, 3), (9,), (0, 4)]


@pytest.fixture
def kernel_launches_paused(monkeypatch):
    """A Triton kernel runs in the interpreter on the CPU, on the host by design: its
    launches are the device's business, what the backend does around them is not.  16-element
    chunks, so that layers span several (the tables are the backend's host-side state)."""
    from triton.runtime.interpreter import InterpretedFunction
    from cblr_ext.backends import triton as tb
    monkeypatch.setattr(tb, "CHUNK", 16)
    traffic = HostTraffic()
    launch = InterpretedFunction.run

    def paused_run(self, *args, **kwargs):
        with traffic.paused():
            return launch(self, *args, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", paused_run)
    return traffic


def steady_state_traffic(rule, backend, variant, traffic) -> list:
    """The events of a third step: the first creates the state, the second the backend's
    cached tables; gradients are written in place, as a training loop with
    ``zero_grad(set_to_none=False)`` or a CUDA graph does."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes()]
    # cpp's carried ‖w‖ (reuse_weight_norm) is host bookkeeping of a CPU-only backend: off here.
    opt = RULES[rule](params, lr=torch.tensor(0.1), backend=backend, reuse_weight_norm=False, **variant)
    for p in params:
        p.grad = torch.zeros_like(p)

    def closure():
        for i, p in enumerate(params):
            p.grad.copy_(torch.sin(p.detach() * 3 + i))
    for _ in range(2):
        closure()
        opt.step(closure)
    closure()
    with traffic:
        opt.step(closure)
    return traffic.events


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_steady_state_step_reads_nothing_on_the_host(rule, backend, variant, request):
    if rule == "cblr" and variant == "lag":
        pytest.skip("lag=1 exists for LARS and MCLR only")
    reason = backends.why_unavailable(backend, "cpu")
    if reason is not None:
        pytest.skip(reason)
    traffic = request.getfixturevalue("kernel_launches_paused") if backend == "triton" else HostTraffic()
    assert steady_state_traffic(rule, backend, VARIANTS[variant], traffic) == []


def test_the_detector_sees_reads_and_copies():
    """The check above is not vacuous: each kind of event is caught, where it happens."""
    x = torch.ones(3)
    with HostTraffic() as traffic:
        bool(x.sum() > 0)
        x.tolist()
        x[x > 0]
        torch.tensor([1.0, 2.0])
        torch.full((2,), 1.0)  # a fill: no host data
    kinds = [kind for kind, _, _ in traffic.events]
    assert kinds == ["host read", "host read", "host read", "host-to-device copy"]
