"""Training across processes (issue 15, docs/algorithm.md "Across ranks"): FSDP2 and
tensor-parallel DTensor parameters on 2 and 4 gloo ranks against single-process runs of
the same model and data computed here; the global skip; collectives per step; DCP
checkpoints; DDP.  The ranks run in two spawned jobs (tests/test_distributed_workers.py),
each stopped past its deadline."""
from __future__ import annotations

import contextlib
import functools
import math
import pathlib
import re

import pytest
import torch
import torch.distributed as dist

import test_distributed_workers as W
from helpers import max_rel_diff

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

TWO_RANK_SCENARIOS = ["fsdp_parity", "tp", "nan_one_rank", "collective_count", "checkpoint", "ddp", "errors"]
STAT_COLUMNS = ("w_norm", "g_norm", "step_norm", "kappa", "ratio", "alpha")
# Per step outside the closure: the sums' collective and the step norms'; MCLR adds the
# radix rounds after the first (2 exact, 1 approx).
# Two param groups share them (packed step-wide).
EXPECTED_COLLECTIVES = {"lars": 2, "mclr": 4, "mclr_approx": 3, "cblr": 2, "lars_two_groups": 2,
                        "mclr_two_groups": 4}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return W.run_ranks(2, TWO_RANK_SCENARIOS, str(tmp_path_factory.mktemp("ranks2")), timeout=300)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return W.run_ranks(4, ["fsdp_parity_cpp", "hsdp_parity"], str(tmp_path_factory.mktemp("ranks4")), timeout=300)


def ranks(job: dict, scenario: str) -> list:
    """Each rank's result of ``scenario``; fails with the rank's traceback if it raised."""
    for result in job[scenario]:
        assert "error" not in result, result["error"]
    return job[scenario]


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same matmul bits
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def single_process(config: str, backend: str, widths=W.WIDTHS):
    """(stats of every step, final parameters) of the plain model in this process."""
    with one_thread():
        model = W.plain_model(widths)
        opt = W.make_optimizer(model, config, backend)
        stats = W.train(model, opt, W.STEPS, widths)
    return stats, {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_close(params: dict, reference: dict, rtol: float) -> None:
    assert params.keys() == reference.keys()
    for name, value in params.items():
        assert max_rel_diff(reference[name], value) <= rtol, name


def assert_stats_close(history: list, reference: list, rtol: float = 1e-5) -> None:
    assert len(history) == len(reference)
    for step, (stats, expected) in enumerate(zip(history, reference)):
        assert stats.keys() == expected.keys()
        for name, row in stats.items():
            assert row["fallback"] == expected[name]["fallback"], (step, name)
            for column in STAT_COLUMNS:
                got, want = row[column], expected[name][column]
                assert (math.isnan(got) and math.isnan(want)) or abs(got - want) <= rtol * abs(want), (
                    step, name, column, got, want)


def assert_same_on_every_rank(per_rank: list, key) -> None:
    first = per_rank[0][key]["stats"]
    for other in per_rank[1:]:
        assert repr(other[key]["stats"]) == repr(first)  # bit-equal floats print alike; NaN too


def assert_matches_single_process(per_rank: list, key, config: str, backend: str) -> None:
    stats, params = single_process(config, backend)
    assert_same_on_every_rank(per_rank, key)
    assert_params_close(per_rank[0][key]["params"], params, 1e-5)
    assert_stats_close(per_rank[0][key]["stats"], stats)
    if config.startswith("mclr"):  # same gradients, same quotients: the median is exact
        kappas = [[row["kappa"] for row in step.values()] for step in per_rank[0][key]["stats"]]
        assert repr(kappas) == repr([[row["kappa"] for row in step.values()] for step in stats])


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("config", list(W.CONFIGS))
def test_fsdp2_two_ranks_match_one_process(two_ranks, config, backend):
    assert_matches_single_process(ranks(two_ranks, "fsdp_parity"), (config, backend), config, backend)


@pytest.mark.parametrize("config", ["mclr", "cblr"])
def test_fsdp2_four_ranks_match_one_process(four_ranks, config):
    assert_matches_single_process(ranks(four_ranks, "fsdp_parity_cpp"), (config, "cpp"), config, "cpp")


@pytest.mark.parametrize("config", ["mclr", "cblr"])
def test_hsdp_2d_mesh_four_ranks_match_one_process(four_ranks, config):
    per_rank = ranks(four_ranks, "hsdp_parity")
    assert per_rank[0]["placements"] == "(Replicate(), Shard(dim=0))"
    assert_matches_single_process(per_rank, (config, "cpp"), config, "cpp")


@pytest.mark.parametrize("config", ["lars", "mclr", "cblr"])
def test_tensor_parallel_layout_matches_one_process(two_ranks, config):
    per_rank = ranks(two_ranks, "tp")
    placements = per_rank[0][config]["placements"]
    assert placements["2.weight"] == "(Shard(dim=1),)" and placements["4.weight"] == "(Replicate(),)"
    stats, params = single_process(config, "cpp", W.TP_WIDTHS)
    assert_same_on_every_rank(per_rank, config)
    # Sharded matmuls sum in another order: the gradients differ in the last bits.
    assert_params_close(per_rank[0][config]["params"], params, 1e-5)
    assert_stats_close(per_rank[0][config]["stats"], stats)


@pytest.mark.parametrize("config", ["mclr", "cblr"])
def test_nan_on_one_rank_skips_on_every_rank(two_ranks, config):
    for rank in ranks(two_ranks, "nan_one_rank"):
        assert rank[config]["unchanged"] and rank[config]["skipped"] == 1
    assert two_ranks["nan_one_rank"][0]["cblr"]["closure_calls"] == 2  # the probe ran, then the skip


def test_collectives_per_step_do_not_grow_with_layers(two_ranks):
    counts = ranks(two_ranks, "collective_count")[0]
    short, long = len(W.WIDTHS) - 1, len(W.LONG_WIDTHS) - 1
    for config, expected in EXPECTED_COLLECTIVES.items():
        for layers in (short, long):
            steps = counts[config, layers]
            assert [len(step) for step in steps] == [expected] * 3, (config, layers, steps)
            assert all(name == "all_reduce" for step in steps for name, _ in step)


@pytest.mark.parametrize("config", ["mclr", "cblr"])
def test_dcp_checkpoint_resumes_bit_identically(two_ranks, config):
    for rank in ranks(two_ranks, "checkpoint"):
        went_on, resumed = rank[config]["went_on"], rank[config]["resumed"]
        assert repr(resumed["stats"]) == repr(went_on["stats"])
        for name, value in went_on["params"].items():
            assert torch.equal(resumed["params"][name], value), name


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP: loading in one process, as meant
@pytest.mark.parametrize("config", ["mclr", "cblr"])
def test_sharded_checkpoint_loads_into_one_process(two_ranks, config):
    result = ranks(two_ranks, "checkpoint")[0][config]
    with one_thread():
        model, opt = W.load_in_one_process(result["path"], lambda model: W.make_optimizer(model, config, "cpp"))
        assert all(torch.is_tensor(s.get("momentum_buffer")) for s in opt.state.values())
        stats = W.train(model, opt, 4)
    assert_params_close(dict(model.named_parameters()), result["went_on"]["params"], 1e-6)
    assert_stats_close(stats, result["went_on"]["stats"], 1e-6)


@pytest.mark.parametrize("config", ["lars", "mclr"])
def test_ddp_needs_nothing(two_ranks, config):
    for rank in ranks(two_ranks, "ddp"):
        assert rank[config]["collectives"] == 0
        _, params = single_process(config, "cpp")
        for name, value in rank[config]["params"].items():
            assert torch.equal(value, params[name]), name  # averaged equal gradients: exact


def test_unreducible_placement_raises_before_anything_changes(two_ranks):
    for rank in ranks(two_ranks, "errors"):
        assert "'encoder.weight'" in rank["partial"] and "Partial" in rank["partial"], rank["partial"]
        assert rank["partial_untouched"] == (True, True)
        assert "lag=1" in rank["lag"], rank["lag"]
        assert rank["lag_untouched"] == (True, True)


def test_readme_fsdp2_example_runs_on_two_ranks(tmp_path):
    """The README's example (fenced ``py``: the single-process README test leaves it here)."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Distributed training", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```py\n(.*?)```", section, re.S)
    per_rank = W.run_script(2, code, str(tmp_path), timeout=120)
    assert repr(per_rank[0]) == repr(per_rank[1])
    assert per_rank[0]["2.weight"]["ratio"] > 0 and not per_rank[0]["2.weight"]["fallback"]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="NCCL needs 2 GPUs")
def test_fsdp2_nccl_two_gpus_match_one_process(tmp_path):
    job = W.run_ranks(2, ["fsdp_parity_cuda"], str(tmp_path), timeout=300, device_type="cuda")
    per_rank = ranks(job, "fsdp_parity_cuda")
    for config in W.CONFIGS:
        stats, params = single_process(config, "reference")
        assert_same_on_every_rank(per_rank, (config, "auto"))
        assert_params_close({n: p.cpu() for n, p in per_rank[0][config, "auto"]["params"].items()}, params, 1e-5)
        assert_stats_close(per_rank[0][config, "auto"]["stats"], stats, 1e-5)
