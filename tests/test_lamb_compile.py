"""LAMB under torch.compile and without host reads: a steady-state step breaks no graph
inside cblr_ext, compiles once while an LR scheduler moves a tensor lr, matches the eager
step, and reads nothing on the host nor copies host data to the device (what a GPU step
needs to stay asynchronous and a CUDA graph to capture it; tests/host_traffic.py)."""
import pytest
import torch
import torch._dynamo

from cblr_ext import LAMB
from cblr_ext.lamb import ADAM_BACKENDS
from helpers import max_rel_diff, mlp
from host_traffic import HostTraffic
from test_compile import assert_compiles_once, cpu_backend, package_breaks
from test_compile import fresh_dynamo  # noqa: F401 (an autouse fixture)
from test_no_sync import kernel_launches_paused  # noqa: F401 (a fixture)

VARIANTS = {  # clipped (apex's default) LAMB, the median rule with a trust clip, unclipped nvlamb
    "lamb": dict(weight_decay=0.01),
    "mclr": dict(weight_decay=0.01, rule="mclr", max_ratio=10.0),
    "nvlamb_unclipped": dict(weight_decay=0.0, nvlamb=True, max_grad_norm=None),
}
# dynamo cannot trace the Triton interpreter (NumPy on the host at every launch): on the CPU
# the named triton backend is left to the host-traffic test.
COMPILED = [b for b in ADAM_BACKENDS if b != "triton"]


class Training:
    """A seeded MLP, LAMB over a tensor lr driven by StepLR, one step on a fixed batch."""

    def __init__(self, backend, **kwargs):
        self.model = mlp()
        gen = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
        self.opt = LAMB(self.model.parameters(), lr=torch.tensor(0.01), backend=backend, **kwargs)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.opt, step_size=7, gamma=0.5)

    def step(self):
        self.opt.zero_grad()
        torch.nn.functional.mse_loss(self.model(self.x), self.y).backward()
        self.opt.step()

    def params(self):
        return [p.detach() for p in self.model.parameters()]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_steady_state_step_has_no_graph_break_in_the_package(variant, backend):
    run = Training(cpu_backend(backend), **VARIANTS[variant])
    run.step()  # creates the state
    assert package_breaks(torch._dynamo.explain(run.step)()) == []


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_training_matches_eager_and_compiles_once(variant, backend):
    backend = cpu_backend(backend)
    eager, compiled = Training(backend, **VARIANTS[variant]), Training(backend, **VARIANTS[variant])
    assert_compiles_once(eager, compiled, "aot_eager", steps=20)
    assert float(compiled.opt.param_groups[0]["lr"]) == pytest.approx(0.01 * 0.5 ** 2)  # the scheduler moved it
    for a, b in zip(eager.params(), compiled.params()):
        assert max_rel_diff(a, b) < 1e-5


def test_a_compiled_step_counts_a_skipped_step():
    eager, compiled = Training("auto"), Training("auto")

    def poisoned(run):
        run.opt.zero_grad()
        torch.nn.functional.mse_loss(run.model(run.x), run.y).backward()
        run.model[0].weight.grad[0, 0] = float("nan")
        run.opt.step()
    eager.step(), compiled.step()
    before = [p.clone() for p in compiled.params()]
    torch.compile(lambda: poisoned(compiled), backend="aot_eager")()
    poisoned(eager)
    assert compiled.opt.skipped_steps == eager.opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, compiled.params()))


@pytest.mark.parametrize("backend", ADAM_BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_steady_state_step_reads_nothing_on_the_host(variant, backend, request):
    backend = cpu_backend(backend)
    traffic = request.getfixturevalue("kernel_launches_paused") if backend == "triton" else HostTraffic()
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in [(6, 7), (3, 2, 3, 3), (9,), (0, 4)]]
    opt = LAMB(params, lr=torch.tensor(0.01), backend=backend, **VARIANTS[variant])
    for p in params:
        p.grad = torch.zeros_like(p)

    def grads():
        for i, p in enumerate(params):
            p.grad.copy_(torch.sin(p.detach() * 3 + i))
    for _ in range(2):
        grads()
        opt.step()
    grads()
    with traffic:
        opt.step()
    assert traffic.events == []
