"""torch.optim conventions, for every rule on every backend here (issue-style checks
of torch's ``common_optimizers.py``): copy/deepcopy/pickle, load-state-dict hooks,
checkpoints of older versions and of other backends, wrong-shaped state, strided
views, tensor hyperparameters, and ``layer_stats`` after a step without gradients."""
import copy
import io
import pickle

import pytest
import torch

import cblr_ext
from cblr_ext import CBLR, LARS, MCLR
from cblr_ext.functional import SCALAR_DTYPE
from helpers import mlp as model, train

RULES = [LARS, MCLR, CBLR]
BACKENDS = cblr_ext.available_backends("cpu")


def same_parameters(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", RULES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_keeps_every_attribute_and_steps_identically(cls, backend, how):
    m = model()
    opt = cls(m.parameters(), lr=0.1, momentum=0.9, backend=backend, skip_nonfinite=False, reuse_weight_norm=False)
    train(m, opt, 2)
    twin_m = copy.deepcopy(m)
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
        # the copy's state belongs to the copied parameters: rebind like torch's test does
        twin = cls(twin_m.parameters(), **{k: v for k, v in opt.defaults.items()},
                   skip_nonfinite=twin.skip_nonfinite, reuse_weight_norm=twin.reuse_weight_norm)
        twin.load_state_dict(copy.deepcopy(opt).state_dict())
        copied = copy.deepcopy(opt)
    else:
        copied = pickle.loads(pickle.dumps(opt))
        twin = cls(twin_m.parameters(), **opt.defaults, skip_nonfinite=copied.skip_nonfinite,
                   reuse_weight_norm=copied.reuse_weight_norm)
        twin.load_state_dict(copied.state_dict())
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public <= set(vars(copied))
    assert (copied.skip_nonfinite, copied.reuse_weight_norm, copied.skipped_steps) == (False, False, 0)
    copied.state_dict()  # saves
    train(m, opt, 2, seed=5)
    train(twin_m, twin, 2, seed=5)
    assert same_parameters(m, twin_m)


def test_a_pickled_optimizer_steps_on_its_own_parameters():
    m = model()
    opt = LARS(m.parameters(), lr=0.1, momentum=0.9, backend="reference")
    train(m, opt, 2)
    m2, opt2 = pickle.loads(pickle.dumps((m, opt)))
    train(m, opt, 1, seed=3)
    train(m2, opt2, 1, seed=3)
    assert same_parameters(m, m2) and opt2.skipped_steps == 0


@pytest.mark.parametrize("cls", RULES)
def test_load_state_dict_pre_hook_result_is_loaded(cls):
    m = model()
    opt = cls(m.parameters(), lr=0.1, momentum=0.9, backend="reference")
    train(m, opt, 2)
    saved = opt.state_dict()
    replaced = copy.deepcopy(saved)
    for s in replaced["state"].values():
        s["kappa"] = torch.tensor(123.0)

    fresh = cls(model().parameters(), lr=0.1, momentum=0.9, backend="reference")
    fresh.register_load_state_dict_pre_hook(lambda opt, sd: replaced)
    fresh.load_state_dict(saved)
    assert all(float(s["kappa"]) == 123.0 for s in fresh.state.values())
    assert all(s["kappa"].dtype == SCALAR_DTYPE for s in fresh.state.values())  # as any loaded κ̄


@pytest.mark.parametrize("cls", RULES)
def test_a_checkpoint_missing_newer_group_keys_loads_and_steps(cls):
    m = model()
    opt = cls(m.parameters(), lr=0.1, momentum=0.9, backend="reference")
    train(m, opt, 2)
    old = opt.state_dict()
    for group in old["param_groups"]:
        for key in ("adapt", "lag", "median", "curvature_interval", "backend"):
            group.pop(key)
    resumed = cls(m.parameters(), lr=0.1, momentum=0.9, backend="reference")
    resumed.load_state_dict(old)
    assert resumed.param_groups[0]["curvature_interval"] == 1
    train(m, resumed, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_backend_chosen_at_construction_is_kept_over_a_checkpoints(backend):
    m = model()
    opt = MCLR(m.parameters(), lr=0.1, momentum=0.9, backend="cuda")  # resolved at the first step only
    checkpoint = opt.state_dict()
    resumed = MCLR(m.parameters(), lr=0.1, momentum=0.9, backend=backend)
    resumed.load_state_dict(checkpoint)
    assert resumed.param_groups[0]["backend"] == backend
    train(m, resumed, 1)


def test_wrong_shaped_loaded_state_raises_before_anything_is_loaded():
    m = model()
    opt = LARS([{"params": m[0].parameters()}, {"params": m[2].parameters()}], lr=0.1, momentum=0.9,
               backend="reference")
    train(m, opt, 1)
    sd = opt.state_dict()
    sd["state"][2]["momentum_buffer"] = torch.zeros(3, 3)  # the first layer of group 2
    before = {k: {n: t.clone() for n, t in s.items()} for k, s in enumerate(opt.state.values())}
    with pytest.raises(ValueError, match="momentum_buffer"):
        opt.load_state_dict(sd)
    for k, s in enumerate(opt.state.values()):
        assert all(torch.equal(t, before[k][n]) for n, t in s.items() if not t.isnan().any())


@pytest.mark.parametrize("cls", RULES)
def test_auto_steps_strided_view_parameters(cls):
    base = torch.randn(10, 5, 2)
    view = torch.nn.Parameter(base[..., 0])
    twin = torch.nn.Parameter(base[..., 0].clone())
    opts = [cls([view], lr=0.1, momentum=0.9), cls([twin], lr=0.1, momentum=0.9, backend="reference")]
    for _ in range(3):
        for p, opt in zip((view, twin), opts):
            def closure(p=p, opt=opt):
                opt.zero_grad()
                loss = (p ** 2).sum() + p.sum()
                loss.backward()
                return loss
            opt.step(closure)
    assert torch.equal(view, twin)


@pytest.mark.parametrize("kwargs, match", [
    (dict(momentum=torch.tensor(0.9)), "momentum must be a Python number"),
    (dict(weight_decay=torch.tensor(0.1)), "weight_decay must be a Python number"),
    (dict(lr=torch.tensor(-1.0)), "Invalid learning rate: -1.0"),
    (dict(lr=torch.tensor([0.1, 0.2])), "one-element"),
    (dict(lr=torch.tensor(1)), "floating"),
])
def test_tensor_hyperparameters_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LARS(model().parameters(), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_stats_after_a_step_without_gradients_is_empty(backend):
    m = model()
    opt = LARS(m.parameters(), lr=0.1, backend=backend)
    train(m, opt, 1)
    assert opt.layer_stats()
    opt.zero_grad(set_to_none=True)
    opt.step()
    assert opt.layer_stats() == {}


def test_state_dict_round_trip_through_bytes_is_bit_identical():
    m, twin = model(), model()
    opt = MCLR(m.parameters(), lr=0.1, momentum=0.9, backend="reference")
    train(m, opt, 2)
    twin.load_state_dict(m.state_dict())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin_opt = MCLR(twin.parameters(), lr=0.1, momentum=0.9, backend="reference")
    twin_opt.load_state_dict(torch.load(buffer))
    train(m, opt, 2, seed=4)
    train(twin, twin_opt, 2, seed=4)
    assert same_parameters(m, twin)


def _round_trips(opt, cls, params):
    """(name, optimizer) after each round trip: deepcopy, pickle, load_state_dict."""
    yield "deepcopy", copy.deepcopy(opt)
    yield "pickle", pickle.loads(pickle.dumps(opt))
    loaded = cls(params, **opt.defaults)  # the defaults construct an optimizer again
    loaded.load_state_dict(opt.state_dict())
    yield "load_state_dict", loaded


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", RULES)
def test_round_trips_leave_groups_and_defaults_exactly_as_they_were(cls, backend):
    m = model()
    opt = cls(m.parameters(), lr=0.1, momentum=0.9, backend=backend)
    train(m, opt, 2)
    before = copy.deepcopy(opt.state_dict())
    defaults = dict(opt.defaults)
    for how, twin in _round_trips(opt, cls, m.parameters()):
        after = twin.state_dict()
        assert twin.defaults == defaults, how
        assert after["param_groups"] == before["param_groups"], how
        assert after["state"].keys() == before["state"].keys(), how
        for k, s in before["state"].items():
            assert after["state"][k].keys() == s.keys(), how
            for name, t in s.items():
                assert torch.equal(after["state"][k][name], t) or (t.isnan().all() and after["state"][k][name].isnan().all()), how
    assert opt.defaults == defaults and opt.state_dict()["param_groups"] == before["param_groups"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", RULES)
def test_a_distributed_checkpoint_round_trip_restores_the_state_exactly(cls, backend, tmp_path):
    """torch.distributed.checkpoint (single process): the state dict saved through
    get_optimizer_state_dict/dcp.save and loaded into a fresh optimizer equals the original
    (groups and every state tensor), and both go on stepping identically.  What DCP's
    optimizer state dict does not carry: ``skipped_steps`` (not part of state or groups)."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    m = model()
    opt = cls(m.parameters(), lr=0.1, momentum=0.9, backend=backend)
    train(m, opt, 2)
    dcp.save({"optim": get_optimizer_state_dict(m, opt)}, checkpoint_id=str(tmp_path))
    twin_m = copy.deepcopy(m)
    twin = cls(twin_m.parameters(), lr=0.1, momentum=0.9, backend=backend)
    target = {"optim": get_optimizer_state_dict(twin_m, twin)}
    dcp.load(target, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(twin_m, twin, target["optim"])
    before, after = opt.state_dict(), twin.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for k, s in before["state"].items():
        assert after["state"][k].keys() == s.keys()
        for name, t in s.items():
            assert torch.equal(after["state"][k][name].nan_to_num(), t.nan_to_num()), name
    train(m, opt, 2, seed=5)
    train(twin_m, twin, 2, seed=5)
    assert same_parameters(m, twin_m)
