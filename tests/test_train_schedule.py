"""BatchSizeSchedule (sizes per epoch/step, every example once per epoch, DataLoader use)
and ScaledLR (linear / sqrt scaling, warm-up)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.data import DataLoader, TensorDataset

from cblr_ext.train import BatchSizeSchedule, ScaledLR


def epochs(schedule, count):
    return [list(schedule) for _ in range(count)]


def test_sizes_per_epoch_growing_and_shrinking():
    schedule = BatchSizeSchedule(20, {0: 4, 2: 8, 3: 3}, shuffle=False)
    sizes = [[len(b) for b in epoch] for epoch in epochs(schedule, 4)]
    assert sizes == [[4] * 5, [4] * 5, [8, 8, 4], [3] * 6 + [2]]
    assert schedule.step == 5 + 5 + 3 + 7
    assert [schedule.batch_size_at(e) for e in range(5)] == [4, 4, 8, 3, 3]


def test_step_milestones_change_the_size_mid_epoch():
    schedule = BatchSizeSchedule(10, {0: 2, 3: 5}, unit="step", shuffle=False)
    first, second = epochs(schedule, 2)
    assert [len(b) for b in first] == [2, 2, 2, 4]   # steps 0-2 at 2, step 3 takes the 4 left
    assert [len(b) for b in second] == [5, 5]
    assert first[0] == [0, 1] and first[-1] == [6, 7, 8, 9]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.dictionaries(st.integers(1, 6), st.integers(1, 64), max_size=3),
       st.integers(1, 64), st.sampled_from(["epoch", "step"]))
def test_every_example_exactly_once_per_epoch(size, later, first, unit):
    schedule = BatchSizeSchedule(size, {0: first, **later}, unit=unit, seed=3)
    for epoch in range(4):
        expected_len = len(schedule)
        batches = list(schedule)
        assert len(batches) == expected_len
        assert sorted(i for b in batches for i in b) == list(range(size))


def test_shuffles_per_epoch_reproducibly():
    a, b = BatchSizeSchedule(50, {0: 7}, seed=1), BatchSizeSchedule(50, {0: 7}, seed=1)
    first = epochs(a, 2)
    assert first == epochs(b, 2)
    assert first[0] != first[1]


def test_works_as_a_dataloader_batch_sampler():
    x = torch.arange(30.0).unsqueeze(1)
    loader = DataLoader(TensorDataset(x, torch.arange(30)), batch_sampler=BatchSizeSchedule(30, {0: 8, 1: 16}))
    for epoch_sizes in ([8, 8, 8, 6], [16, 14]):
        batches = list(loader)
        assert [len(yb) for _, yb in batches] == epoch_sizes
        seen = torch.cat([yb for _, yb in batches])
        assert sorted(seen.tolist()) == list(range(30))
        for xb, yb in batches:
            torch.testing.assert_close(xb.squeeze(1), yb.float())


@pytest.mark.parametrize("kwargs, match", [
    (dict(dataset_size=0, milestones={0: 4}), "dataset_size"),
    (dict(dataset_size=10, milestones={1: 4}), "milestones"),
    (dict(dataset_size=10, milestones={0: 0}), "milestones"),
    (dict(dataset_size=10, milestones={0: 4, -1: 2}), "milestones"),
    (dict(dataset_size=10, milestones={0: 4}, unit="batch"), "unit"),
])
def test_schedule_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchSizeSchedule(**kwargs)


def _optimizer(*lrs):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])


@pytest.mark.parametrize("rule, batch, factor", [("linear", 512, 4.0), ("linear", 64, 0.5), ("sqrt", 512, 2.0),
                                                 ("sqrt", 32, 0.5), (None, 4096, 1.0)])
def test_scaling_rules(rule, batch, factor):
    opt = _optimizer(0.1, 0.3)
    assert ScaledLR(opt, 128, rule=rule).apply(batch, step=0) == pytest.approx(factor)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * factor, 0.3 * factor])


def test_warmup_ramps_linearly_then_holds():
    opt = _optimizer(0.2)
    scaled = ScaledLR(opt, 100, rule="linear", warmup_steps=4)
    lrs = []
    for step in range(6):
        scaled.apply(200, step, decay=0.5 if step == 5 else 1.0)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.2])


def test_tensor_lr_is_filled_in_place():
    lr = torch.tensor(0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ScaledLR(opt, 10, rule="sqrt").apply(40, 0)
    assert opt.param_groups[0]["lr"] is lr and math.isclose(lr.item(), 0.2, rel_tol=1e-6)


@pytest.mark.parametrize("kwargs, match", [(dict(base_batch_size=0), "base_batch_size"), (dict(rule="cubic"), "rule"),
                                           (dict(warmup_steps=-1), "warmup_steps")])
def test_scaled_lr_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScaledLR(_optimizer(0.1), **{"base_batch_size": 8, **kwargs})
    with pytest.raises(ValueError, match="batch_size"):
        ScaledLR(_optimizer(0.1), 8).factor(0, 0)
