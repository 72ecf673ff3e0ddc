"""torch.optim conventions, for every optimizer of the table (tests/optim_db.py) on every
backend here (issue-style checks of torch's ``common_optimizers.py``): copy/deepcopy/pickle,
load-state-dict hooks, checkpoints of older versions and of other backends, wrong-shaped
state, strided views, tensor hyperparameters, and ``layer_stats`` after a step without
gradients.  Each optimizer constructs with its entry's own settings (``info.base``); a
check that does not apply to one, or that it fails, is marked by its entry."""
import copy
import io
import pickle

import pytest
import torch

import cblr_ext
from helpers import mlp as model, train
from optim_db import entries

BACKENDS = cblr_ext.available_backends("cpu")


def skip_unless_it_runs(info, backend):
    if backend != "reference" and backend not in info.backends:
        pytest.skip(f"{info.name} has no kernels in the {backend} backend")


def build(info, params, backend="reference", **kwargs):
    return info.cls(params, **{**info.base, "backend": backend, **kwargs})


def same_parameters(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def same_state(before: dict, after: dict, how=""):
    """Two state dicts' ``state`` equal key by key, tensor by tensor (NaN where NaN: κ̄ before it exists)."""
    assert after.keys() == before.keys(), how
    for k, s in before.items():
        assert after[k].keys() == s.keys(), how
        for name, t in s.items():
            assert torch.equal(after[k][name].nan_to_num(), t.nan_to_num()), (how, k, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", entries("copies"))
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_keeps_every_attribute_and_steps_identically(info, backend, how):
    skip_unless_it_runs(info, backend)
    m = model()
    opt = build(info, m.parameters(), backend, **info.optimizer_wide)
    train(m, opt, 2)
    twin_m = copy.deepcopy(m)
    copied = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    # the copy's state belongs to the copied parameters: rebind like torch's test does
    twin = info.cls(twin_m.parameters(), **opt.defaults, **{k: getattr(copied, k) for k in info.optimizer_wide})
    twin.load_state_dict(copied.state_dict())
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public <= set(vars(copied))
    assert {k: getattr(copied, k) for k in info.optimizer_wide} == info.optimizer_wide
    assert copied.skipped_steps == 0
    train(m, opt, 2, seed=5)
    train(twin_m, twin, 2, seed=5)
    assert same_parameters(m, twin_m)


@pytest.mark.parametrize("info", entries("pickle_with_parameters"))
def test_a_pickled_optimizer_steps_on_its_own_parameters(info):
    m = model()
    opt = build(info, m.parameters())
    train(m, opt, 2)
    m2, opt2 = pickle.loads(pickle.dumps((m, opt)))
    train(m, opt, 1, seed=3)
    train(m2, opt2, 1, seed=3)
    assert same_parameters(m, m2) and opt2.skipped_steps == 0


@pytest.mark.parametrize("info", entries("load_state_dict_pre_hook"))
def test_load_state_dict_pre_hook_result_is_loaded(info):
    key, dtype = info.scalar_state
    m = model()
    opt = build(info, m.parameters())
    train(m, opt, 2)
    saved = opt.state_dict()
    replaced = copy.deepcopy(saved)
    for s in replaced["state"].values():
        s[key] = torch.tensor(123.0)

    fresh = build(info, model().parameters())
    fresh.register_load_state_dict_pre_hook(lambda opt, sd: replaced)
    fresh.load_state_dict(saved)
    assert all(float(s[key]) == 123.0 for s in fresh.state.values())
    assert all(s[key].dtype == dtype for s in fresh.state.values())  # as any loaded one


@pytest.mark.parametrize("info", entries("older_checkpoint"))
def test_a_checkpoint_missing_newer_group_keys_loads_and_steps_as_the_original(info):
    m = model()
    opt = build(info, m.parameters())
    train(m, opt, 2)
    old = opt.state_dict()
    for group in old["param_groups"]:
        for key in info.newer_group_keys:
            group.pop(key)
    twin_m = copy.deepcopy(m)
    resumed = build(info, twin_m.parameters())
    resumed.load_state_dict(old)
    train(m, opt, 2, seed=5)
    train(twin_m, resumed, 2, seed=5)
    assert same_parameters(m, twin_m)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", entries("construct_with_an_unrunnable_backend"))
def test_a_checkpoint_of_a_backend_this_machine_lacks_loads_and_steps(info, backend):
    skip_unless_it_runs(info, backend)
    m = model()
    opt = build(info, m.parameters(), "cuda")  # resolved at the first step only
    resumed = build(info, m.parameters(), backend)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.param_groups[0]["backend"] == backend
    train(m, resumed, 1)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("info", entries("backend_kept_over_a_checkpoint"))
def test_the_backend_chosen_at_construction_is_kept_over_a_checkpoints(info, backend):
    skip_unless_it_runs(info, backend)
    m = model()
    opt = build(info, m.parameters(), "reference")
    train(m, opt, 1)
    resumed = build(info, m.parameters(), backend)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.param_groups[0]["backend"] == backend


@pytest.mark.parametrize("info", entries("wrong_shaped_state_refused"))
def test_wrong_shaped_loaded_state_raises_before_anything_is_loaded(info):
    m = model()
    opt = build(info, [{"params": m[0].parameters()}, {"params": m[2].parameters()}])
    train(m, opt, 1)
    sd = opt.state_dict()
    sd["state"][2][info.shaped_state] = torch.zeros(3, 3)  # the first layer of group 2
    before = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(ValueError, match=info.shaped_state):
        opt.load_state_dict(sd)
    same_state(before, opt.state_dict()["state"])


@pytest.mark.parametrize("info", entries("strided_view_parameters"))
def test_auto_steps_strided_view_parameters(info):
    base = torch.randn(10, 5, 2)
    view = torch.nn.Parameter(base[..., 0])
    twin = torch.nn.Parameter(base[..., 0].clone())
    opts = [build(info, [view], "auto"), build(info, [twin])]
    for _ in range(3):
        for p, opt in zip((view, twin), opts):
            def closure(p=p, opt=opt):
                opt.zero_grad()
                loss = (p ** 2).sum() + p.sum()
                loss.backward()
                return loss
            opt.step(closure)
    assert torch.equal(view, twin)


def _bad_tensor_hyperparameters():
    for info in entries("tensor_hyperparameters"):
        for kwargs, match in info.values[0].bad_tensor_hyperparameters:
            yield pytest.param(info.values[0], kwargs, match, marks=info.marks,
                               id=f"{info.id}-{next(iter(kwargs))}-{match.split()[0]}")


@pytest.mark.parametrize("info, kwargs, match", list(_bad_tensor_hyperparameters()))
def test_tensor_hyperparameters_are_validated(info, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(info, model().parameters(), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", entries("layer_stats_without_gradients"))
def test_layer_stats_after_a_step_without_gradients_is_empty(info, backend):
    skip_unless_it_runs(info, backend)
    m = model()
    opt = build(info, m.parameters(), backend)
    train(m, opt, 1)
    assert opt.layer_stats()
    opt.zero_grad(set_to_none=True)
    opt.step()
    assert opt.layer_stats() == {}


@pytest.mark.parametrize("info", entries("state_dict_through_bytes"))
def test_state_dict_round_trip_through_bytes_is_bit_identical(info):
    m, twin = model(), model()
    opt = build(info, m.parameters())
    train(m, opt, 2)
    twin.load_state_dict(m.state_dict())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin_opt = build(info, twin.parameters())
    twin_opt.load_state_dict(torch.load(buffer))
    train(m, opt, 2, seed=4)
    train(twin, twin_opt, 2, seed=4)
    assert same_parameters(m, twin)


@pytest.mark.parametrize("info", entries("skipped_steps_in_state_dict"))
def test_skipped_steps_survive_a_state_dict_round_trip(info):
    m = model()
    opt = build(info, m.parameters())
    train(m, opt, 1)

    def closure():  # a gradient with an Inf: the step is skipped
        opt.zero_grad()
        loss = m(torch.ones(1, 4)).sum()
        loss.backward()
        m[0].weight.grad[0, 0] = float("inf")
        return loss
    opt.step(closure)
    resumed = build(info, m.parameters())
    resumed.load_state_dict(opt.state_dict())
    assert opt.skipped_steps == resumed.skipped_steps == 1


def _round_trips(opt, cls, params):
    """(name, optimizer) after each round trip: deepcopy, pickle, load_state_dict."""
    yield "deepcopy", copy.deepcopy(opt)
    yield "pickle", pickle.loads(pickle.dumps(opt))
    loaded = cls(params, **opt.defaults)  # the defaults construct an optimizer again
    loaded.load_state_dict(opt.state_dict())
    yield "load_state_dict", loaded


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", entries("round_trips"))
def test_round_trips_leave_groups_and_defaults_exactly_as_they_were(info, backend):
    skip_unless_it_runs(info, backend)
    m = model()
    opt = build(info, m.parameters(), backend)
    train(m, opt, 2)
    before = copy.deepcopy(opt.state_dict())
    defaults = dict(opt.defaults)
    for how, twin in _round_trips(opt, info.cls, m.parameters()):
        after = twin.state_dict()
        assert twin.defaults == defaults, how
        assert after["param_groups"] == before["param_groups"], how
        same_state(before["state"], after["state"], how)
    assert opt.defaults == defaults and opt.state_dict()["param_groups"] == before["param_groups"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", entries("distributed_checkpoint"))
def test_a_distributed_checkpoint_round_trip_restores_the_state_exactly(info, backend, tmp_path):
    """torch.distributed.checkpoint (single process): the state dict saved through
    get_optimizer_state_dict/dcp.save and loaded into a fresh optimizer equals the original
    (groups and every state tensor), and both go on stepping identically.  What DCP's
    optimizer state dict does not carry: ``skipped_steps`` (not part of state or groups)."""
    skip_unless_it_runs(info, backend)
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    m = model()
    opt = build(info, m.parameters(), backend)
    train(m, opt, 2)
    dcp.save({"optim": get_optimizer_state_dict(m, opt)}, checkpoint_id=str(tmp_path))
    twin_m = copy.deepcopy(m)
    twin = build(info, twin_m.parameters(), backend)
    target = {"optim": get_optimizer_state_dict(twin_m, twin)}
    dcp.load(target, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(twin_m, twin, target["optim"])
    before, after = opt.state_dict(), twin.state_dict()
    assert after["param_groups"] == before["param_groups"]
    same_state(before["state"], after["state"])
    train(m, opt, 2, seed=5)
    train(twin_m, twin, 2, seed=5)
    assert same_parameters(m, twin_m)
