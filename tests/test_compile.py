"""torch.compile of whole training steps (forward, backward, ``opt.step()``).

LARS and MCLR on every CPU backend that torch.compile traces: ``reference`` (the
``torch.ops.cblr_ext_reference`` ops: the reference kernels, opaque), ``cpp`` and ``auto``
(the ``torch.ops.cblr_ext`` ops); all traced through the ops' fakes.  ``triton`` on the CPU is not among them: the named backend calls
its Python wrappers directly and the interpreter runs each kernel as NumPy on the host,
which dynamo would trace into (triton/runtime/interpreter.py) and break at every launch;
on a GPU the Triton kernels sit behind the ops (test_gpu_* below).

A step breaks the graph nowhere inside cblr_ext once the state exists (the first step,
which creates it, reads the skip flag on the host: a skipped step creates no state), does
not recompile when an LR scheduler moves a tensor lr, and leaves no warning; CBLR breaks
only at its closure (forward and backward, user code).
"""
import collections
import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import cblr_ext
from cblr_ext import CBLR, LARS, MCLR, backends
from helpers import assert_graph_replay_equals_eager, max_rel_diff, mlp

PACKAGE = str(Path(cblr_ext.__file__).parent)
RULES = {"lars": LARS, "mclr": MCLR}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cpu_backend(name):
    reason = backends.why_unavailable(name, "cpu")
    if reason is not None:
        pytest.skip(reason)
    return name


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Training:
    """A seeded MLP, its optimizer over a tensor lr driven by an LR scheduler, and one
    training step on a fixed batch."""

    def __init__(self, rule, backend, device="cpu", **kwargs):
        self.model = mlp().to(device)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(16, 4, generator=gen).to(device)
        self.y = torch.randn(16, 2, generator=gen).to(device)
        self.opt = RULES[rule](self.model.parameters(), lr=torch.tensor(0.5, device=device), momentum=0.9,
                               weight_decay=1e-4, backend=backend, **kwargs)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.opt, step_size=7, gamma=0.5)

    def step(self):
        self.opt.zero_grad()
        loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss

    def params(self):
        return [p.detach() for p in self.model.parameters()]


def package_breaks(explanation) -> list:
    """(file, line, function) of every graph break at a line of cblr_ext."""
    breaks = []
    for reason in explanation.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        if frame is not None and frame.filename.startswith(PACKAGE):
            breaks.append((Path(frame.filename).name, frame.lineno, frame.name))
    return breaks


@pytest.mark.parametrize("backend", ["reference", "cpp", "auto"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("lag", [0, 1])
def test_a_training_step_has_no_graph_break_in_the_package(rule, backend, lag):
    run = Training(rule, cpu_backend(backend), lag=lag)
    run.step()  # creates the state
    assert package_breaks(torch._dynamo.explain(run.step)()) == []


def test_the_first_step_breaks_only_where_it_creates_state():
    """The state-creating step reads the skip flag on the host, once (a skipped step must
    create no buffer: step_common.NewState.buffers); dynamo resumes after it only outside
    the ``with CurvatureProbe`` block of ``step`` around it (a user-defined context
    manager), so that breaks too."""
    run = Training("lars", cpu_backend("auto"))
    breaks = package_breaks(torch._dynamo.explain(run.step)())
    assert {name for _, _, name in breaks} == {"buffers", "step"}


def assert_compiles_once(eager, compiled, compiler: str, steps=30):
    """``steps`` eager and compiled steps side by side, each followed by the schedulers'
    step; the compiled step compiles on its first call only."""
    counter = CompileCounterWithBackend(compiler)
    step = torch.compile(compiled.step, backend=counter)
    eager.step(), compiled.step()  # the state exists before the first compiled call
    for i in range(steps):
        eager.step()
        step()
        if i == 0:
            frames = counter.frame_count
        eager.scheduler.step(), compiled.scheduler.step()
    assert counter.frame_count == frames


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("rule", RULES)
def test_compiled_training_matches_eager_and_compiles_once(rule, backend, capfd):
    """30 steps with the lr halved every 7 (StepLR on a tensor lr): the compiled run (AOT
    autograd, through the ops' fakes) gives the eager run's parameters and never
    recompiles after its first call; nothing of the package is printed or warned."""
    backend = cpu_backend(backend)
    eager, compiled = Training(rule, backend), Training(rule, backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_compiles_once(eager, compiled, "aot_eager")
    assert float(compiled.opt.param_groups[0]["lr"]) == 0.5 * 0.5 ** 4  # the scheduler did move it
    for a, b in zip(eager.params(), compiled.params()):
        assert max_rel_diff(a, b) < 1e-5
    assert [w for w in caught if w.filename.startswith(PACKAGE)] == []
    assert "cblr_ext" not in capfd.readouterr().err


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_compiled_step_counts_skipped_steps_and_keeps_its_statistics(backend):
    """What the step records on the optimizer survives compilation (torch 2.13 drops
    attribute assignments to an Optimizer in a compiled step): the skipped-step count of
    a NaN gradient, and layer_stats() equal to the eager twin's."""
    backend = cpu_backend(backend)
    eager, compiled = Training("lars", backend), Training("lars", backend)
    poisoned = []

    def poisoned_step(run):
        run.opt.zero_grad()
        torch.nn.functional.mse_loss(run.model(run.x), run.y).backward()
        if poisoned:
            run.model[0].weight.grad[0, 0] = float("nan")
        run.opt.step()
    step = torch.compile(lambda: poisoned_step(compiled), backend="aot_eager")
    eager.step(), compiled.step()
    for i in range(4):
        if i == 2:
            poisoned.append(True)
        poisoned_step(eager)
        step()
    assert compiled.opt.skipped_steps == eager.opt.skipped_steps == 2
    got, want = compiled.opt.layer_stats(), eager.opt.layer_stats()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-5, nan_ok=True)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_inductor_compiled_steps_match_eager(backend):
    """The real lowering: the reference ops (reference) and the C++ kernels (auto) called
    from inductor's graph."""
    backend = cpu_backend(backend)
    eager, compiled = Training("mclr", backend), Training("mclr", backend)
    step = torch.compile(compiled.step)
    for _ in range(4):
        eager.step()
        step()
    for a, b in zip(eager.params(), compiled.params()):
        assert max_rel_diff(a, b) < 1e-5


@pytest.mark.parametrize("rule", RULES)
def test_a_compiled_reference_step_is_the_same_graph_for_any_layer_count(rule):
    """``backend="reference"`` calls the opaque ``torch.ops.cblr_ext_reference`` ops: the step
    is one graph whose nodes (each op once, a few scalars) do not grow with the layers, so
    neither does the compiler's work (ResNet-50's 161 tensors: bench/notes/compile.md)."""
    nodes = {}
    for layers in (3, 12):
        params = [torch.nn.Parameter(torch.randn(5, 4)) for _ in range(layers)]
        for p in params:
            p.grad = torch.randn(5, 4)
        opt = RULES[rule](params, lr=torch.tensor(0.1), momentum=0.9, backend="reference")
        opt.step()  # the state exists
        graphs = []

        def keep(gm, example_inputs):
            graphs.append(gm)
            return gm.forward
        torch._dynamo.reset()
        torch.compile(opt.step, backend=keep)()
        assert len(graphs) == 1
        nodes[layers] = collections.Counter(str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function")
    assert nodes[3] == nodes[12]
    assert nodes[3]["cblr_ext_reference.layerwise_reduce"] == nodes[3]["cblr_ext_reference.layerwise_update_"] == 1


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_cblr_breaks_the_graph_only_at_its_closure(backend):
    """CBLR re-evaluates the loss at w + s: the closure's forward and backward are user
    code, and the only breaks are in them."""
    model = mlp()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
    opt = CBLR(model.parameters(), lr=torch.tensor(0.1), momentum=0.9, backend=cpu_backend(backend))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)
    opt.step(closure)  # the probe's buffers exist
    explanation = torch._dynamo.explain(opt.step)(closure)
    assert explanation.graph_break_count > 0  # at the closure's backward
    assert package_breaks(explanation) == []


# ------------------------------------------------------------------- GPU

@needs_gpu
@pytest.mark.parametrize("rule", RULES)
def test_gpu_compiled_step_matches_eager(rule):
    """auto on a GPU: the CUDA or Triton kernels behind the ops, inductor around them."""
    eager, compiled = Training(rule, "auto", device="cuda"), Training(rule, "auto", device="cuda")
    assert_compiles_once(eager, compiled, "inductor")
    for a, b in zip(eager.params(), compiled.params()):
        assert max_rel_diff(a, b) < 1e-5


@needs_gpu
@pytest.mark.parametrize("rule", RULES)
def test_gpu_reference_step_replays_in_a_cuda_graph(rule):
    """The reference reads nothing on the host: its step is capturable as it stands."""
    def setup():
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).cuda().requires_grad_() for s in [(64, 32), (32,), (8, 4, 3, 3)]]
        for p in params:
            p.grad = torch.zeros_like(p)
        return params, RULES[rule](params, lr=torch.tensor(0.1, device="cuda"), momentum=0.9, backend="reference")

    assert_graph_replay_equals_eager(setup)
