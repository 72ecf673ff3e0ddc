"""``python -m bench --distributed`` on the tiny suite: every rule runs on 2 gloo ranks and
one process, with the collective counts the README states per step (2 for LARS and CBLR,
3 for MCLR's approx median, 4 for the exact one)."""
import torch.distributed as dist
import pytest

from bench import distributed

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def test_every_rule_runs_sharded_with_the_documented_collectives():
    result = distributed.run(small=False, steps=2, suite="tiny")
    rows = result["rows"]
    assert {rule: row["collectives"] for rule, row in rows.items()} == {
        "LARS": 2, "MCLR exact": 4, "MCLR approx": 3, "CBLR": 2}
    for row in rows.values():
        assert row["single_ms"] > 0 and row["sharded_ms"] > 0 and row["collective_bytes"] > 0
        # Each rank's step, op by op: the package's two passes, and every collective counted above.
        for ops in [row["single_passes"], *row["rank_passes"]]:
            calls = {p["op"]: p["calls_per_step"] for p in ops}
            assert calls["layerwise_reduce"] == calls["layerwise_update_"] == 1
            assert ops[-1]["op"] == "other"
        for ops in row["rank_passes"]:
            assert sum(p["calls_per_step"] for p in ops if p["op"].startswith("c10d::")) == row["collectives"]
    assert all(p["op"] != "median_histogram" for p in rows["MCLR exact"]["single_passes"])
    assert any(p["op"] == "median_histogram" for p in rows["MCLR exact"]["rank_passes"][0])
