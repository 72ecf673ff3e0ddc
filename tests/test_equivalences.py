"""Equivalences of docs/algorithm.md: (a) LARS = Algorithm 1 of You, Gitman &
Ginsburg 2017; (b) no adapted layer + constant γ = torch.optim.SGD."""
import pytest
import torch

from cblr_ext import CBLR, LARS, MCLR


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)) for _ in range(n)]


def loss_fn(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def lars_algorithm_1(params, grads, velocities, lr, momentum, weight_decay, eta):
    """You et al. 2017, Algorithm 1, for every layer l:
    λ = η‖w‖/(‖∇L(w)‖ + β‖w‖);  v ← m·v + γ_t·λ·(∇L(w) + β·w);  w ← w − v."""
    for w, g, v in zip(params, grads, velocities):
        local_lr = eta * w.norm() / (g.norm() + weight_decay * w.norm())
        v.mul_(momentum).add_(lr * local_lr * (g + weight_decay * w))
        w.sub_(v)


def test_lars_is_algorithm_1_with_a_changing_lr():
    model, twin = mlp(), mlp()
    lrs = [4.0, 3.0, 2.5, 1.0, 0.5, 0.25, 2.0, 1.5]
    opt = LARS(model.parameters(), lr=lrs[0], momentum=0.9, weight_decay=5e-4, trust_coefficient=1e-3,
               eps=0.0, exclude_1d=False, backend="reference")
    velocities = [torch.zeros_like(p) for p in twin.parameters()]
    for lr, (x, y) in zip(lrs, batches(len(lrs))):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        twin.zero_grad()
        loss_fn(twin, x, y).backward()
        with torch.no_grad():
            lars_algorithm_1(list(twin.parameters()), [p.grad for p in twin.parameters()], velocities,
                             lr, 0.9, 5e-4, 1e-3)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [LARS, MCLR, CBLR])
@pytest.mark.parametrize("momentum,nesterov,weight_decay", [(0.0, False, 0.0), (0.9, False, 1e-3),
                                                            (0.9, True, 1e-3)])
def test_no_adapted_layer_equals_sgd(cls, momentum, nesterov, weight_decay):
    model, twin = mlp(), mlp()
    opt = cls(model.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
              adapt=False, backend="reference")
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov,
                          weight_decay=weight_decay, dampening=0)
    for x, y in batches(8):
        for net, o in ((model, opt), (twin, sgd)):
            def closure():
                o.zero_grad()
                loss = loss_fn(net, x, y)
                loss.backward()
                return loss
            o.step(closure)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert all(not s["fallback"] and s["ratio"] == 1.0 for s in opt.layer_stats().values())
