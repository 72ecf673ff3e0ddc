"""LAMB across processes: FSDP2 parameters on 2 and 4 gloo ranks against single-process runs
of the same model and data (whole-layer norms, medians, secant sums and the global clip
norm), the global skip, collectives per step and DCP checkpoints.  The ranks run in spawned jobs
(tests/test_distributed_workers.py), each stopped past its deadline."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

import test_distributed_workers as W
from test_distributed import assert_params_close, assert_stats_close, one_thread, ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

BACKENDS = W.lamb_backends()
# Per step outside the closure: the clip norm's, the sums' and the step norms'; MCLR adds the
# radix rounds after the first (2, exact); without clipping one fewer.  Groups share them,
# and CBLR's secant sums travel in the sums' (none for the probe's shift or restore).
EXPECTED_COLLECTIVES = {"lamb": 3, "lamb_mclr": 5, "lamb_two_groups": 3, "lamb_nvlamb_unclipped": 2,
                        "lamb_cblr": 3, "lamb_cblr_every_2nd": 2}
CBLR_CONFIGS = [c for c, kwargs in W.LAMB_CONFIGS.items() if kwargs.get("rule") == "cblr"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return W.run_ranks(2, ["lamb_parity", "lamb_nan_one_rank", "lamb_collective_count", "lamb_checkpoint"],
                       str(tmp_path_factory.mktemp("lamb2")), timeout=300)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return W.run_ranks(4, ["lamb_parity"], str(tmp_path_factory.mktemp("lamb4")), timeout=300)


@functools.lru_cache(maxsize=None)
def single_process(config: str, backend: str):
    with one_thread():
        model = W.plain_model()
        opt = W.make_lamb(model, config, backend)
        stats = W.train(model, opt, W.STEPS)
    return stats, {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_matches_single_process(per_rank: list, config: str, backend: str) -> None:
    stats, params = single_process(config, backend)
    first = per_rank[0][config, backend]
    for other in per_rank[1:]:
        assert repr(other[config, backend]["stats"]) == repr(first["stats"])
    assert_params_close(first["params"], params, 1e-5)
    assert_stats_close(first["stats"], stats)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(W.LAMB_CONFIGS))
def test_fsdp2_two_ranks_match_one_process(two_ranks, config, backend):
    assert_matches_single_process(ranks(two_ranks, "lamb_parity"), config, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(W.LAMB_CONFIGS))
def test_fsdp2_four_ranks_match_one_process(four_ranks, config, backend):
    assert_matches_single_process(ranks(four_ranks, "lamb_parity"), config, backend)


def test_the_clip_bites():
    """The parity above is not vacuous: the clip bites (‖g‖ > the bound on the first step)."""
    with one_thread():
        model = W.plain_model()
        x, y = W.batch()
        torch.nn.functional.mse_loss(model(x), y).backward()
        norm = torch.stack([p.grad.double().square().sum() for p in model.parameters()]).sum().sqrt()
    assert norm > W.CLIP


@pytest.mark.parametrize("config", CBLR_CONFIGS)
def test_the_secant_is_measured(config):
    """The CBLR parity is not vacuous: from the second step on, the adapted layers take
    r = η/κ̄ of a finite measured κ (no fallback), re-measured on the due steps."""
    stats, _ = single_process(config, "reference")
    matrices = [name for name in stats[0] if name.endswith("weight")]
    assert all(stats[0][name]["fallback"] for name in matrices)
    for step in stats[1:]:
        for name in matrices:
            row = step[name]
            assert not row["fallback"] and 0 < row["kappa"] < float("inf"), (name, row)


@pytest.mark.parametrize("case", ["lamb", "lamb_mclr", "lamb_cblr", "lamb_cblr_probe"])
def test_nan_on_one_rank_skips_on_every_rank(two_ranks, case):
    for rank in ranks(two_ranks, "lamb_nan_one_rank"):
        assert rank[case]["unchanged"] and rank[case]["skipped"] == 1
    # CBLR: the closure ran for g_t and for the probe's g_s (the poisoned one in the _probe case).
    assert ranks(two_ranks, "lamb_nan_one_rank")[0][case]["closure_calls"] == (2 if "cblr" in case else 1)


def test_collectives_per_step(two_ranks):
    counts = ranks(two_ranks, "lamb_collective_count")[0]
    for config, expected in EXPECTED_COLLECTIVES.items():
        assert [len(step) for step in counts[config]] == [expected] * 3, (config, counts[config])
        assert all(name == "all_reduce" for step in counts[config] for name, _ in step)


@pytest.mark.parametrize("config", ["lamb_mclr", "lamb_cblr"])
def test_dcp_checkpoint_resumes_bit_identically(two_ranks, config):
    for rank in ranks(two_ranks, "lamb_checkpoint"):
        went_on, resumed = rank[config]["went_on"], rank[config]["resumed"]
        assert repr(resumed["stats"]) == repr(went_on["stats"])
        for name, value in went_on["params"].items():
            assert torch.equal(resumed["params"][name], value), name
        # The parameter-sized state is sharded as the parameters are (DCP reshards it).
        sharded = {"exp_avg", "exp_avg_sq"} | ({"prev_step"} if config == "lamb_cblr" else set())
        assert {key for key, kind in rank[config]["state_types"] if kind == "DTensor"} == sharded


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP: loading in one process, as meant
def test_sharded_cblr_checkpoint_loads_into_one_process(two_ranks):
    """The whole layers' s, m and v come back from the shards: one process goes on as the ranks did."""
    result = ranks(two_ranks, "lamb_checkpoint")[0]["lamb_cblr"]
    with one_thread():
        model, opt = W.load_in_one_process(result["path"], lambda model: W.make_lamb(model, "lamb_cblr", "reference"))
        assert all(torch.is_tensor(opt.state[p].get("prev_step")) for p in model.parameters())
        stats = W.train(model, opt, 4)
    assert_params_close(dict(model.named_parameters()), result["went_on"]["params"], 1e-6)
    assert_stats_close(stats, result["went_on"]["stats"], 1e-6)
