"""Smoke test of the report command: ``python -m bench --quick`` on the 5-tensor
suite produces a well-formed JSON record set, a PNG chart and a table.
Timings are machine-dependent: nothing here asserts a speed."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the bench extra is not installed: pip install -e '.[bench]'")

ROOT = Path(__file__).resolve().parents[1]
TINY_NUMEL = 64 * 32 + 64 + 64 + 10 * 64 + 10  # bench.suites "tiny", by hand: 2826
CBLR_EXT_VARIANTS = {("LARS", "lag=0"), ("LARS", "lag=1"), ("LARS", "lag=1,no-skip"), ("MCLR", "exact"),
                     ("MCLR", "approx"), ("MCLR", "exact,lag=1"), ("MCLR", "approx,lag=1"), ("CBLR", "re-measure"), ("CBLR", "reuse")}
# Bytes per parameter element in fp32 (bench/README.md, "What a step moves").
BYTES_PER_ELEMENT = {("SGD", "fused"): 20, ("LARS", "lag=0"): 24, ("LARS", "lag=1"): 24,
                     ("MCLR", "exact"): 36, ("MCLR", "approx,lag=1"): 24, ("CBLR", "re-measure"): 48}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--suite", "tiny", "--quiet", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = out.glob("*.json")
    return json.loads(json_path.read_text()), json_path, proc.stdout


def test_writes_json_and_png(run):
    report, json_path, _ = run
    assert json_path.name.startswith("cpu-") and json_path.name.endswith("-quick.json")
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_metadata(run):
    import torch
    report, _, _ = run
    assert report["device"] == "cpu" and report["device_name"]
    assert report["torch_version"] == torch.__version__
    assert isinstance(report["threads"], int) and report["threads"] >= 1
    assert report["quick"] is True and report["small"] is True
    assert math.isfinite(report["copy_bandwidth"]["gbps"])
    assert report["suites"] == {"tiny": {"tensors": 5, "numel": TINY_NUMEL, "description": "5-tensor MLP (smoke test)"}}


def test_one_record_per_case(run):
    report, _, _ = run
    records = report["records"]
    keys = [(r["suite"], r["dtype"], r["optimizer"], r["backend"], r["variant"]) for r in records]
    assert len(keys) == len(set(keys))
    # Every backend is either benchmarked in all 8 variants or listed with a reason.
    timed = {r["backend"] for r in records if (r["optimizer"], r["variant"]) in CBLR_EXT_VARIANTS}
    assert "reference" in timed
    for backend in ("reference", "cpp", "triton", "cuda"):
        assert (backend in timed) != (backend in report["backends_unavailable"])
    expected = {("tiny", "fp32", opt, backend, variant) for backend in timed for opt, variant in CBLR_EXT_VARIANTS}
    expected |= {("tiny", "fp32", "SGD", "torch", "fused"), ("tiny", "fp32", "SGD", "torch", "foreach"),
                 ("tiny", "fp32", "LARS", "pytorch-optimizer", "foreach"),
                 ("tiny", "fp32", "LARS", "pytorch-optimizer", "per-param")}
    assert set(keys) == expected  # --quick skips torch.compile ...
    assert "torch.compile(reference)" in report["backends_unavailable"]  # ... and says so


def test_records_are_complete_and_consistent(run):
    report, _, _ = run
    for r in report["records"]:
        if r["backend"] == "pytorch-optimizer" and r["error"]:
            pytest.importorskip("pytorch_optimizer")
        assert r["error"] is None, r
        for field in ("median_ms", "q1_ms", "q3_ms", "iqr_ms", "gbps", "fraction_of_copy", "ratio_to_fused_sgd"):
            assert isinstance(r[field], float) and math.isfinite(r[field]), (field, r)
        assert r["q1_ms"] <= r["q3_ms"] and r["samples"] >= 3
        assert r["gbps"] == pytest.approx(r["bytes_per_step"] / r["median_ms"] / 1e6)
        per_element = BYTES_PER_ELEMENT.get((r["optimizer"], r["variant"]))
        if per_element is not None:
            assert r["bytes_per_step"] == per_element * TINY_NUMEL
        if r["optimizer"] == "CBLR":
            assert r["closure_calls"] == (2 if r["variant"] == "re-measure" else 1)
            assert r["with_closure_ms"] == pytest.approx(r["median_ms"] + r["closure_calls"] * r["closure_ms"])
        if r["optimizer"] == "SGD":
            assert r["speedup_vs_reference"] is None
        else:
            assert isinstance(r["speedup_vs_reference"], float)
        if r["backend"] == "reference":
            assert r["speedup_vs_reference"] == 1.0
        if (r["optimizer"], r["backend"], r["variant"]) == ("SGD", "torch", "fused"):
            assert r["ratio_to_fused_sgd"] == 1.0 and "fused_sgd_ms" not in r
        else:  # fused SGD was timed in turn with the case, and the ratio is over those times
            assert r["ratio_to_fused_sgd"] == pytest.approx(r["median_ms"] / r["fused_sgd_ms"])


def test_prints_the_table(run):
    _, json_path, stdout = run
    assert "| SGD | torch | fused |" in stdout and "| LARS | reference | lag=0 |" in stdout
    assert str(json_path.with_suffix("")) in stdout


def test_microbenchmarks_run():
    """The pytest-benchmark suite runs (each benchmark once, untimed) on the tiny suite."""
    pytest.importorskip("pytest_benchmark")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "bench/benchmarks",
                           "--bench-suite", "tiny", "--benchmark-disable"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "error" not in proc.stdout
