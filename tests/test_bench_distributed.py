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
