"""The rank side of tests/test_distributed.py (no tests here): spawning ranks on 127.0.0.1
with a deadline, the models, the data and the scenarios each rank runs.  Every rank
trains on the same full batch, so FSDP2's averaged gradients equal the single-process
ones bit for bit and any difference comes from the optimizer."""
from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cblr_ext
from bench.distributed import counting_collectives, paused

CONFIGS = {  # name: (optimizer, keywords); MCLR re-measures every 2nd step (norms it lacks in between)
    "lars": ("LARS", dict(lr=1.0, momentum=0.9, weight_decay=1e-3)),
    "mclr": ("MCLR", dict(lr=1.0, momentum=0.9, weight_decay=1e-3, curvature_interval=2)),
    "mclr_approx": ("MCLR", dict(lr=1.0, momentum=0.9, weight_decay=1e-3, median="approx")),
    "cblr": ("CBLR", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
}
WIDTHS = (7, 13, 1, 5)  # odd sizes; 13 → 1 has fewer rows than ranks
LONG_WIDTHS = (7, 13, 1, 5, 9, 3, 6, 11, 4, 5)
TP_WIDTHS = (6, 10, 4, 3)  # tensor parallelism's Shard(-1) activations need even widths
STEPS = 20


# ------------------------------------------------------------------ models and training

def plain_model(widths=WIDTHS) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def batch(widths=WIDTHS):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(32, widths[0], generator=generator), torch.randn(32, widths[-1], generator=generator)


def make_optimizer(model, config: str, backend: str, two_groups=False, **overrides):
    """``two_groups``: matrices, then vectors without weight decay (as training scripts split them)."""
    cls, kwargs = CONFIGS[config]
    params = list(model.named_parameters())
    if two_groups:
        params = [{"params": [(n, p) for n, p in params if p.ndim > 1]},
                  {"params": [(n, p) for n, p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return getattr(cblr_ext, cls)(params, backend=backend, **dict(kwargs, **overrides))


def make_closure(model, opt, x, y, after_backward=None):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if after_backward is not None:
            after_backward()
        return loss
    return closure


def train(model, opt, steps: int, widths=WIDTHS) -> list:
    """``steps`` steps on one batch; the layer statistics of each."""
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in batch(widths))
    closure = make_closure(model, opt, x, y)
    history = []
    for _ in range(steps):
        opt.step(closure)
        history.append(opt.layer_stats())
    return history


def full(tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor)."""
    return tensor.full_tensor().clone() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def full_params(model) -> dict:
    return {name: full(p) for name, p in model.named_parameters()}


def fsdp_model(mesh, widths=WIDTHS):
    """FSDP2 per layer for all Linear layers but the last, whose parameters the root shards."""
    from torch.distributed.fsdp import fully_shard
    model = plain_model(widths)
    for layer in list(model)[:-1]:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def tp_model(mesh):
    """Tensor parallel: Shard(0) weight and bias, then Shard(1) weight with a Replicate bias,
    then a layer whose parameters are all Replicate."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    model = plain_model(TP_WIDTHS)
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    distribute_module(model[4], mesh,
                      input_fn=lambda mod, inputs, m: tuple(DTensor.from_local(t, m, [Replicate()]) for t in inputs),
                      output_fn=lambda mod, outputs, m: outputs.to_local())
    return model


def bits(tensor) -> bytes:
    """A tensor's bytes (NaN equals NaN, -0 differs from 0)."""
    from cblr_ext.distributed import local
    return local(tensor).detach().contiguous().cpu().numpy().tobytes()


def snapshot(model, opt) -> list:
    """The bytes of every parameter shard and every state tensor of this rank."""
    out = [bits(p) for p in model.parameters()]
    for p in model.parameters():
        for key, value in sorted(opt.state.get(p, {}).items()):
            out.append((key, bits(value)))
    return out


# ----------------------------------------------------------------------- scenarios

def scenario_fsdp_parity(mesh, out, configs=tuple(CONFIGS), backends=("reference", "cpp")):
    """Every config × backend, 20 steps of the FSDP2 model: stats of every step, final params."""
    result = {}
    for backend in backends:
        for config in configs:
            model = fsdp_model(mesh)
            opt = make_optimizer(model, config, backend)
            stats = train(model, opt, STEPS)
            result[config, backend] = dict(stats=stats, params=full_params(model))
    return result


def scenario_fsdp_parity_cpp(mesh, out):
    return scenario_fsdp_parity(mesh, out, configs=("mclr", "cblr"), backends=("cpp",))


def scenario_hsdp_parity(mesh, out):
    """HSDP: a 2-D mesh, (Replicate, Shard(0)) placements."""
    from torch.distributed.device_mesh import init_device_mesh
    hsdp = init_device_mesh("cpu", (2, mesh.size() // 2), mesh_dim_names=("replicate", "shard"))
    result = scenario_fsdp_parity(hsdp, out, configs=("mclr", "cblr"), backends=("cpp",))
    result["placements"] = str(tuple(fsdp_model(hsdp)[0].weight.placements))
    return result


def scenario_fsdp_parity_cuda(mesh, out):
    return scenario_fsdp_parity(mesh, out, backends=("auto",))


def scenario_tp(mesh, out):
    result = {}
    for config in ("lars", "mclr", "cblr"):
        model = tp_model(mesh)
        opt = make_optimizer(model, config, "cpp")
        stats = train(model, opt, STEPS, TP_WIDTHS)
        result[config] = dict(stats=stats, params=full_params(model),
                              placements={n: str(tuple(p.placements)) for n, p in model.named_parameters()})
    return result


def step_with_nan_on_one_rank(model, opt, poisoned_call: int) -> dict:
    """After 3 steps, one step whose closure's ``poisoned_call``-th call (1: g_t; 2: the
    probe's g_s) leaves a NaN in rank 1's first non-empty gradient shard: whether every
    parameter shard and state tensor of this rank kept its bytes, the skip count, the calls."""
    train(model, opt, 3)
    x, y = batch()
    calls = []

    def poison():
        calls.append(1)
        if dist.get_rank() == 1 and len(calls) == poisoned_call:
            p = next(q for q in model.parameters() if q.grad.to_local().numel())
            p.grad.to_local().view(-1)[0] = float("nan")
    before = snapshot(model, opt)
    opt.step(make_closure(model, opt, x, y, poison))
    return dict(unchanged=snapshot(model, opt) == before, skipped=opt.skipped_steps, closure_calls=len(calls))


def scenario_nan_one_rank(mesh, out):
    """A NaN in one rank's shard of g_t: every rank skips, nothing changes anywhere."""
    result = {}
    for config in ("mclr", "cblr"):
        model = fsdp_model(mesh)
        result[config] = step_with_nan_on_one_rank(model, make_optimizer(model, config, "cpp"), poisoned_call=1)
    return result


def scenario_collective_count(mesh, out):
    """Collectives (count, bytes) of each step outside the closure, for a short and a long model."""
    configs = {"lars": {}, "mclr": dict(curvature_interval=1), "mclr_approx": {}, "cblr": {},
               "lars_two_groups": dict(two_groups=True),
               "mclr_two_groups": dict(two_groups=True, curvature_interval=1)}
    result = {}
    for config, overrides in configs.items():
        for widths in (WIDTHS, LONG_WIDTHS):
            model = fsdp_model(mesh, widths)
            opt = make_optimizer(model, config.removesuffix("_two_groups"), "cpp", **overrides)
            result[config, len(widths) - 1] = collectives_per_step(model, opt, widths)
    return result


def collectives_per_step(model, opt, widths, steps: int = 3) -> list:
    """(name, bytes) of every collective of each of ``steps`` steps, the closure's left out."""
    x, y = batch(widths)
    inner = make_closure(model, opt, x, y)

    def closure():
        with paused():
            return inner()
    counts = []
    with counting_collectives(counts):
        for _ in range(steps):
            counts.append([])
            opt.step(closure)
    return counts


def scenario_checkpoint(mesh, out):
    """Save through torch.distributed.checkpoint after 4 steps, go on 4 steps; a fresh model
    and optimizer loaded from the checkpoint go on the same 4 steps."""
    return {config: checkpoint_round_trip(mesh, os.path.join(out, f"checkpoint-{config}"),
                                          lambda model: make_optimizer(model, config, "cpp"))
            for config in ("mclr", "cblr")}


def checkpoint_round_trip(mesh, path: str, make) -> dict:
    """Save the FSDP2 model and ``make(model)``'s optimizer through DCP after 4 steps, go on
    4 steps; a fresh model and optimizer loaded from ``path`` go on the same 4 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    model = fsdp_model(mesh)
    opt = make(model)
    train(model, opt, 4)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    went_on = dict(stats=train(model, opt, 4), params=full_params(model))
    model = fsdp_model(mesh)
    opt = make(model)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    state_types = sorted({(key, type(value).__name__) for s in opt.state.values() for key, value in s.items()})
    return dict(path=path, went_on=went_on, resumed=dict(stats=train(model, opt, 4), params=full_params(model)),
                state_types=state_types)


def load_in_one_process(path: str, make):
    """The plain model and ``make(model)``'s optimizer loaded from the DCP checkpoint at
    ``path`` (saved by ranks), in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    model = plain_model()
    opt = make(model)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    return model, opt


def scenario_ddp(mesh, out):
    """DDP: plain replicated parameters; the optimizer issues no collective."""
    from torch.nn.parallel import DistributedDataParallel
    result = {}
    for config in ("lars", "mclr"):
        model = DistributedDataParallel(plain_model())
        opt = make_optimizer(model, config, "cpp")
        counts = collectives_per_step(model, opt, WIDTHS, STEPS)
        result[config] = dict(collectives=sum(map(len, counts)),
                              params={n.removeprefix("module."): full(p) for n, p in model.named_parameters()})
    return result


def scenario_errors(mesh, out):
    """What cannot be reduced raises, naming the parameter, before anything changes."""
    from torch.distributed.tensor import DTensor, Partial
    result = {}
    p = torch.nn.Parameter(DTensor.from_local(torch.ones(4, 3), mesh, [Partial()]))
    p.grad = DTensor.from_local(torch.ones(4, 3), mesh, [Partial()])
    opt = cblr_ext.LARS([("encoder.weight", p)], lr=0.1, momentum=0.9)
    result["partial"] = _error_of(opt.step)
    result["partial_untouched"] = (len(opt.state) == 0, bits(p) == bits(torch.ones(4, 3)))
    model = fsdp_model(mesh)
    opt = make_optimizer(model, "lars", "cpp", lag=1)
    before = full_params(model)
    result["lag"] = _error_of(lambda: opt.step(make_closure(model, opt, *batch())))
    result["lag_untouched"] = (len(opt.state) == 0,
                               all(torch.equal(before[n], full(q)) for n, q in model.named_parameters()))
    return result


def _error_of(fn):
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------------ spawning

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, scenarios, out, device_type):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the single-process runs use 1 thread too: same matmul bits
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device_type, (world,))
    try:
        for name in scenarios:
            try:
                result = globals()[f"scenario_{name}"](mesh, out)
            except Exception:
                result = {"error": f"rank {rank}: {traceback.format_exc()}"}
            torch.save(result, os.path.join(out, f"{name}.{rank}.pt"))
    finally:
        dist.destroy_process_group()
    _exit_before_finalization()


def _exit_before_finalization():
    """torch 2.13's gloo sometimes aborts a rank in interpreter finalization after FSDP2
    ("terminate called without an active exception", ~1 run in 5, with torch.optim.SGD as
    well): the results are saved by now, so the rank skips finalization."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _script_main(rank, world, port, code, out):
    """Run ``code`` as torchrun would start it; keep its ``opt.layer_stats()``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    torch.save(namespace["opt"].layer_stats(), os.path.join(out, f"script.{rank}.pt"))
    _exit_before_finalization()


def _spawn(fn, args, world: int, timeout: float, what: str) -> None:
    context = mp.start_processes(fn, args=(world, free_port()) + args, nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish {what} within {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def run_ranks(world: int, scenarios: list, out: str, timeout: float, device_type="cpu") -> dict:
    """Run ``scenarios`` on ``world`` spawned ranks; {scenario: [result of each rank]}.
    Stops every rank past ``timeout`` seconds."""
    _spawn(_rank_main, (list(scenarios), out, device_type), world, timeout, str(scenarios))
    return {name: [torch.load(os.path.join(out, f"{name}.{rank}.pt"), weights_only=False) for rank in range(world)]
            for name in scenarios}


def run_script(world: int, code: str, out: str, timeout: float) -> list:
    """``code`` on ``world`` ranks started as torchrun starts them; each rank's layer_stats()."""
    _spawn(_script_main, (code, out), world, timeout, "the script")
    return [torch.load(os.path.join(out, f"script.{rank}.pt")) for rank in range(world)]


# ------------------------------------------------------- the Adam base (LAMB)

CLIP = 0.25  # below the model's first gradient norm (~0.54): the global clip bites
LAMB_CONFIGS = {  # name: LAMB's keywords (every one clips but the nvlamb one)
    "lamb": dict(lr=0.01, weight_decay=0.01, max_grad_norm=CLIP),
    "lamb_mclr": dict(lr=0.01, weight_decay=0.01, rule="mclr", max_ratio=50.0, max_grad_norm=CLIP),
    "lamb_two_groups": dict(lr=0.01, weight_decay=0.01, two_groups=True, max_grad_norm=CLIP),
    "lamb_nvlamb_unclipped": dict(lr=0.01, weight_decay=0.0, nvlamb=True, max_grad_norm=None, exclude_1d=True),
    # CBLR: the secant on every step, κ̄ averaged; two groups, the vectors' without decay (not
    # adapted).  Then re-measured every 2nd step (κ̄ reused in between), unclipped.  (lr: both
    # keep a valid κ̄ on every step after the first: tests/test_lamb_distributed.py.)
    "lamb_cblr": dict(lr=0.5, weight_decay=0.01, rule="cblr", max_ratio=50.0, curvature_ema=0.9,
                      two_groups=True, max_grad_norm=CLIP),
    "lamb_cblr_every_2nd": dict(lr=1.0, weight_decay=0.01, rule="cblr", curvature_interval=2, max_grad_norm=None),
}


def make_lamb(model, config: str, backend: str):
    kwargs = dict(LAMB_CONFIGS[config])
    params = list(model.named_parameters())
    if kwargs.pop("two_groups", False):  # matrices, then vectors without weight decay
        params = [{"params": [(n, p) for n, p in params if p.ndim > 1]},
                  {"params": [(n, p) for n, p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return cblr_ext.LAMB(params, backend=backend, **kwargs)


def lamb_backends() -> tuple:
    """The backends with kernels of the Adam ops on this machine's CPU."""
    from cblr_ext.lamb import ADAM_BACKENDS
    return tuple(b for b in ADAM_BACKENDS if b != "auto" and b in cblr_ext.available_backends())


def scenario_lamb_parity(mesh, out):
    """Every LAMB config × backend, 20 steps of the FSDP2 model: stats of every step, final params."""
    result = {}
    for backend in lamb_backends():
        for config in LAMB_CONFIGS:
            model = fsdp_model(mesh)
            opt = make_lamb(model, config, backend)
            result[config, backend] = dict(stats=train(model, opt, STEPS), params=full_params(model))
    return result


def scenario_lamb_nan_one_rank(mesh, out):
    """A NaN in one rank's shard of g (for CBLR: of g_t, or of the probe's g_s): every rank
    skips; params, m, v, step counts (and κ̄, age, s) unchanged."""
    cases = {"lamb": ("lamb", 1), "lamb_mclr": ("lamb_mclr", 1), "lamb_cblr": ("lamb_cblr", 1),
             "lamb_cblr_probe": ("lamb_cblr", 2)}
    result = {}
    for case, (config, poisoned_call) in cases.items():
        model = fsdp_model(mesh)
        result[case] = step_with_nan_on_one_rank(model, make_lamb(model, config, "reference"), poisoned_call)
    return result


def scenario_lamb_collective_count(mesh, out):
    """Collectives of each LAMB step outside the closure."""
    result = {}
    for config in LAMB_CONFIGS:
        model = fsdp_model(mesh, LONG_WIDTHS)
        result[config] = collectives_per_step(model, make_lamb(model, config, "reference"), LONG_WIDTHS)
    return result


def scenario_lamb_checkpoint(mesh, out):
    """DCP: save after 4 steps, go on 4; a fresh model and LAMB loaded from it go on the same 4."""
    return {config: checkpoint_round_trip(mesh, os.path.join(out, f"checkpoint-{config}"),
                                          lambda model: make_lamb(model, config, "reference"))
            for config in ("lamb_mclr", "lamb_cblr")}
