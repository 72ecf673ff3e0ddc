"""discard_small_losses: kept counts, which samples, ties, warm-up, schedules and gradients."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from cblr_ext.train import discard_small_losses


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.floats(0.0, 0.99))
def test_keeps_the_largest_losses_with_ties_by_position(values, fraction):
    losses = torch.tensor(values, dtype=torch.float32)
    n = len(values)
    dropped = min(math.floor(fraction * n + 1e-9), n - 1)
    # by hand: order by (loss, position), drop the first `dropped`
    expected = sorted(sorted(range(n), key=lambda i: (values[i], i))[dropped:])
    loss, kept = discard_small_losses(losses, fraction, return_kept=True)
    assert sorted(kept.tolist()) == expected
    assert loss.item() == pytest.approx(sum(values[i] for i in expected) / len(expected))


@pytest.mark.parametrize("n, fraction, kept", [(10, 0.3, 7), (100, 0.29, 71), (8, 0.5, 4), (7, 0.5, 4),
                                               (1, 0.9, 1), (3, 0.0, 3), (10, 0.95, 1)])
def test_exact_kept_counts(n, fraction, kept):
    _, indices = discard_small_losses(torch.randn(n), fraction, return_kept=True)
    assert indices.numel() == kept


def test_all_equal_losses_drop_the_first_positions():
    _, kept = discard_small_losses(torch.ones(10), 0.4, return_kept=True)
    assert sorted(kept.tolist()) == [4, 5, 6, 7, 8, 9]


def test_warmup_and_schedule():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert discard_small_losses(losses, 0.5, step=1, warmup=2).item() == pytest.approx(2.5)
    assert discard_small_losses(losses, 0.5, step=2, warmup=2).item() == pytest.approx(3.5)
    schedule = lambda step: 0.25 * step   # noqa: E731
    assert discard_small_losses(losses, schedule, step=0).item() == pytest.approx(2.5)
    assert discard_small_losses(losses, schedule, step=1).item() == pytest.approx(3.0)
    assert discard_small_losses(losses, schedule, step=3).item() == pytest.approx(4.0)


def test_gradient_only_through_kept_samples():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    per_sample = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    loss, kept = discard_small_losses(per_sample, 0.25, return_kept=True)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    # by hand: the mean loss of the 9 largest-loss samples alone
    largest = per_sample.detach().argsort(descending=True)[:9]
    assert sorted(kept.tolist()) == sorted(largest.tolist())
    reference = torch.nn.functional.cross_entropy(model(x[largest]), y[largest])
    for got, want in zip(grads, torch.autograd.grad(reference, list(model.parameters()))):
        torch.testing.assert_close(got, want)
    # and per sample: dropped samples get no gradient
    leaf = per_sample.detach().requires_grad_()
    discard_small_losses(leaf, 0.25).backward()
    expected = torch.zeros(12)
    expected[largest] = 1 / 9
    torch.testing.assert_close(leaf.grad, expected)


@pytest.mark.parametrize("kwargs, match", [
    (dict(per_sample_losses=torch.ones(2, 3), fraction=0.1), "per_sample_losses"),
    (dict(per_sample_losses=torch.ones(0), fraction=0.1), "per_sample_losses"),
    (dict(per_sample_losses=torch.ones(4), fraction=1.0), "fraction"),
    (dict(per_sample_losses=torch.ones(4), fraction=-0.1), "fraction"),
    (dict(per_sample_losses=torch.ones(4), fraction=0.1, warmup=-1), "warmup"),
])
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        discard_small_losses(**kwargs)
