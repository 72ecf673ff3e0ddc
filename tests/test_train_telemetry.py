"""StructureLogger: values against hand computations, the loss-change columns, the files,
and no host synchronisation added to the steps between flushes."""
import csv
import json
import math

import pytest
import torch
from torch.func import functional_call

from cblr_ext import CBLR, LARS
from cblr_ext.train import StructureLogger


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    batches = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(6)]
    return model, batches


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def test_sgd_norms_by_hand():
    model, batches = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logger = StructureLogger(model.named_parameters(), opt, every=4)
    expected = []
    for x, y in batches[:4]:
        # by hand: autograd on a copy of the weights; plain SGD steps 0.1·g
        params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        loss = torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        expected.append((loss.item(), [g.norm().item() for g in grads]))
        logger.step(_closure(model, opt, x, y))
    assert len(logger.rows) == 4 * 4   # flushed at step 4, four layers
    for step, (loss, g_norms) in enumerate(expected):
        rows = [r for r in logger.rows if r["step"] == step]
        assert [r["layer"] for r in rows] == ["0.weight", "0.bias", "2.weight", "2.bias"]
        for row, g in zip(rows, g_norms):
            assert row["g_norm"] == pytest.approx(g, rel=1e-5)
            assert row["step_norm"] == pytest.approx(0.1 * g, rel=1e-4)
            assert row["loss"] == pytest.approx(loss, rel=1e-6)
            assert math.isnan(row["kappa"]) and math.isnan(row["ratio"])   # SGD has no layer_stats
            assert math.isnan(row["loss_change_same_batch"])
        if step + 1 < len(expected):
            assert rows[0]["loss_change_next_batch"] == pytest.approx(expected[step + 1][0] - loss, rel=1e-5)


def test_lars_kappa_and_ratio_on_flush_steps_match_the_rule():
    model, batches = _setup(1)
    opt = LARS(model.named_parameters(), lr=1.0, weight_decay=1e-3)
    logger = StructureLogger(model.named_parameters(), opt, every=3)
    for i, (x, y) in enumerate(batches):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        logger.step(_closure(model, opt, x, y))
        w, g = before["2.weight"], model[2].weight.grad
        row = [r for r in logger.rows if r["step"] == i and r["layer"] == "2.weight"] if i % 3 == 2 else None
        if row:
            # docs/algorithm.md: κ = (‖g‖ + β‖w‖ + ε)/‖w‖, r = η/κ with η = 1e-3
            kappa = (g.norm() + 1e-3 * w.norm() + 1e-8) / w.norm()
            assert row[0]["kappa"] == pytest.approx(kappa.item(), rel=1e-5)
            assert row[0]["ratio"] == pytest.approx(1e-3 / kappa.item(), rel=1e-5)
            # the logger measures w_t − w_{t+1} as stored: w_{t+1} = fl(w_t − s) moves each
            # element by s_i to within half an ulp, so the two norms differ by ≤ 2^-24·‖w‖
            assert row[0]["step_norm"] == pytest.approx(opt.layer_stats()["2.weight"]["step_norm"],
                                                        rel=1e-6, abs=2 ** -24 * w.norm().item())
    off_flush = [r for r in logger.rows if r["step"] % 3 != 2]
    assert off_flush and all(math.isnan(r["kappa"]) for r in off_flush)


def _logged_rows(params_of):
    model, batches = _setup(1)
    opt = LARS(params_of(model), lr=1.0, weight_decay=1e-3)
    logger = StructureLogger(model.named_parameters(), opt, every=3)
    for x, y in batches:
        logger.step(_closure(model, opt, x, y))
    return logger.rows


def test_layers_are_named_alike_for_parameters_and_named_parameters():
    """The optimizer keys its statistics "group.index" without names; the logger still
    finds κ and r of each of its named layers (the values the named case checks above)."""
    named = _logged_rows(lambda model: model.named_parameters())
    unnamed = _logged_rows(lambda model: model.parameters())
    assert [r["layer"] for r in unnamed] == [r["layer"] for r in named]
    flushed = [r for r in unnamed if r["step"] % 3 == 2]
    assert len(flushed) == 2 * 4 and all(r["kappa"] > 0 and r["ratio"] > 0 for r in flushed)
    for a, b in zip(named, unnamed):
        for column in ("kappa", "ratio", "g_norm", "step_norm"):
            assert a[column] == pytest.approx(b[column], rel=1e-6, nan_ok=True), (a, b, column)


def test_unnamed_parameters_are_refused_with_the_fix():
    model, _ = _setup()
    with pytest.raises(TypeError, match=r"named_parameters\(\)"):
        StructureLogger(model.parameters(), LARS(model.parameters(), lr=1.0))


def test_cblr_probe_gives_the_same_batch_loss_change():
    model, batches = _setup(2)
    opt = CBLR(model.parameters(), lr=0.1, momentum=0.9, curvature_interval=2)
    logger = StructureLogger(model.named_parameters(), opt, every=len(batches))
    previous = None
    expected = []
    for x, y in batches:
        with torch.no_grad():
            now = torch.nn.functional.cross_entropy(model(x), y).item()
            # by hand: the loss of this batch at the weights before the last step
            before = (torch.nn.functional.cross_entropy(functional_call(model, previous, (x,)), y).item()
                      if previous else math.nan)
        expected.append(now - before)
        previous = {n: p.detach().clone() for n, p in model.named_parameters()}
        logger.step(_closure(model, opt, x, y))
    got = [r["loss_change_same_batch"] for r in logger.rows if r["layer"] == "0.weight"]
    # the probe runs on steps 1, 3, 5 (first measurement on step 1, then every 2nd step)
    for step, (g, e) in enumerate(zip(got, expected)):
        if step % 2 == 1:
            assert g == pytest.approx(e, rel=1e-3, abs=1e-6)
        else:
            assert math.isnan(g)


SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__")


def _count_syncs(monkeypatch, fn):
    calls = []
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    fn()
    monkeypatch.undo()
    return calls


@pytest.mark.parametrize("make", [lambda p: LARS(p, lr=1.0, momentum=0.9),
                                  lambda p: CBLR(p, lr=0.1, momentum=0.9),
                                  lambda p: torch.optim.SGD(p, lr=0.1)])
def test_no_host_sync_added_between_flushes(monkeypatch, make):
    def steps(with_logger):
        model, batches = _setup(3)
        opt = make(model.parameters())
        logger = StructureLogger(model.named_parameters(), opt, every=100)
        step = logger.step if with_logger else opt.step
        return lambda: [step(_closure(model, opt, x, y)) for x, y in batches]
    plain = _count_syncs(monkeypatch, steps(False))
    logged = _count_syncs(monkeypatch, steps(True))
    assert logged == plain


def test_files_hold_every_column(tmp_path):
    model, batches = _setup()
    opt = LARS(model.named_parameters(), lr=1.0)
    logger = StructureLogger(model.named_parameters(), opt, every=2)
    for x, y in batches[:3]:
        logger.step(_closure(model, opt, x, y))
    logger.to_csv(tmp_path / "t.csv")
    logger.to_json(tmp_path / "t.json")
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    records = json.loads((tmp_path / "t.json").read_text())
    assert len(rows) == len(records) == 3 * 4
    assert list(rows[0]) == ["step", "layer", "g_norm", "step_norm", "kappa", "ratio", "loss",
                             "loss_change_same_batch", "loss_change_next_batch"]
    assert records[0]["kappa"] is None and records[4]["kappa"] > 0   # sampled on step 1 (a flush)
    assert records[0]["loss_change_next_batch"] == pytest.approx(records[4]["loss"] - records[0]["loss"])
    assert records[-1]["loss_change_next_batch"] is None


def test_bad_input():
    model, _ = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="every"):
        StructureLogger(model.named_parameters(), opt, every=0)
    with pytest.raises(ValueError, match="named_parameters"):
        StructureLogger([], opt)
    logger = StructureLogger(model.named_parameters(), opt)
    with pytest.raises(ValueError, match="column"):
        logger.series("speed", "0.weight")
    with pytest.raises(ValueError, match="layer"):
        logger.series("g_norm", "9.weight")
