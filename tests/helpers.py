"""Comparison helpers shared by the test files."""
import torch


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |a| (0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def mlp(seed=0):
    """A 4-8-2 MLP, seeded."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def train(model, opt, steps, seed=1):
    """``steps`` closure steps of an MSE loss on seeded random batches of 16."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)


def sin_grads(params, step):
    """Deterministic gradients of a step, written in place (fixed addresses, as graph replay needs)."""
    for i, p in enumerate(params):
        p.grad.copy_(torch.sin(p.detach() * (step + 1) + i))


def assert_graph_replay_equals_eager(setup, warm=3, steps=6):
    """``setup()`` -> (params, optimizer), twice: ``steps`` eager steps against ``warm`` eager
    steps on a side stream, one captured step, and replays of it; parameters bit-equal."""
    eager, eager_opt = setup()
    for step in range(steps):
        sin_grads(eager, step)
        eager_opt.step()
    params, opt = setup()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: kernels, state and tables exist before the capture
        for step in range(warm):
            sin_grads(params, step)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(warm, steps):
        sin_grads(params, step)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, params):
        assert torch.equal(a, b)
