"""Smoke test of the report command: ``python -m bench --quick`` on the 5-tensor
suite produces a well-formed JSON record set, a PNG chart and a table.
Timings are machine-dependent: nothing here asserts a speed."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="the bench extra is not installed: pip install -e '.[bench]'")

ROOT = Path(__file__).resolve().parents[1]
TINY_NUMEL = 64 * 32 + 64 + 64 + 10 * 64 + 10  # bench.suites "tiny", by hand: 2826
CBLR_EXT_VARIANTS = {("LARS", "lag=0"), ("LARS", "lag=0,reuse-w-norm"), ("LARS", "lag=1"), ("LARS", "lag=1,no-skip"), ("MCLR", "exact"),
                     ("MCLR", "approx"), ("MCLR", "exact,lag=1"), ("MCLR", "approx,lag=1"), ("CBLR", "re-measure"),
                     ("CBLR", "reuse"), ("LARS", "lag=0,GradScaler"), ("LARS", "lag=0,unscale_"),
                     ("MCLR", "exact,GradScaler"), ("MCLR", "exact,unscale_")}
# Bytes per parameter element in fp32 (bench/README.md, "What a step moves"); GradScaler's
# Inf check reads g once more, unscale_ also writes it.
BYTES_PER_ELEMENT = {("SGD", "fused"): 20, ("AdamW", "fused"): 28, ("LARS", "lag=0"): 28, ("LARS", "lag=0,reuse-w-norm"): 24,
                     ("LARS", "lag=1"): 24,
                     ("MCLR", "exact"): 36, ("MCLR", "approx,lag=1"): 24, ("CBLR", "re-measure"): 52,
                     ("LARS", "lag=0,GradScaler"): 32, ("LARS", "lag=0,unscale_"): 36,
                     ("MCLR", "exact,GradScaler"): 40, ("MCLR", "exact,unscale_"): 44,
                     ("LAMB", "no-clip"): 44, ("LAMB", "clip"): 48, ("LAMB", "clip,foreach"): 48}


def bench_env():
    """The checkout importable from any directory (appended: an installed cblr_ext still wins)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    return env


def bench_outputs_under(root, since):
    """Files under ``root`` named like a run's output and written after ``since``."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".git"]
        found += [Path(folder, f) for f in files if f.startswith("cpu-") and f.endswith((".json", ".png"))
                  and Path(folder, f).stat().st_mtime >= since]
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``--quick`` as a user runs it, without --out, from a directory outside the checkout."""
    cwd = tmp_path_factory.mktemp("bench")
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--suite", "tiny", "--quiet"],
                          cwd=cwd, env=bench_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = (cwd / "bench-results").glob("*.json")
    return json.loads(json_path.read_text()), json_path, proc.stdout, started


def test_writes_json_and_one_png_per_suite_and_dtype(run):
    report, json_path, _, _ = run
    assert json_path.name.startswith("cpu-") and json_path.name.endswith("-quick.json")
    (png,) = json_path.parent.glob("*.png")
    assert png.name == json_path.stem + "-tiny-fp32.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_writes_nothing_under_the_repository(run):
    *_, started = run
    assert bench_outputs_under(ROOT, started) == []


def test_run_metadata(run):
    import torch
    report, *_ = run
    assert report["device"] == "cpu" and report["device_name"] and report["clock"] == "WallClock"
    assert report["torch_version"] == torch.__version__
    assert isinstance(report["threads"], int) and report["threads"] >= 1
    assert report["quick"] is True and report["small"] is True
    assert report["confidence"] == 0.95 and report["budget"]["target"] == 0.05
    assert math.isfinite(report["copy_bandwidth"]["gbps"])
    assert report["suites"] == {"tiny": {"tensors": 5, "numel": TINY_NUMEL, "description": "5-tensor MLP (smoke test)"}}


def test_machine_state_at_start_and_end(run):
    report, _, stdout, _ = run
    state = report["machine"]
    assert state["cpu_count"] >= 1 and isinstance(state["warnings"], list)
    for copy in (state["copy_start"], state["copy_end"]):
        assert 0 < copy["gbps_low"] <= copy["gbps"] <= copy["gbps_high"]
    assert state["copy_start"] == report["copy_bandwidth"]
    for warning in state["warnings"]:  # whatever the machine's state, each warning is printed
        assert warning in stdout


def test_one_record_per_case(run):
    report, *_ = run
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
                 ("tiny", "fp32", "AdamW", "torch", "fused"), ("tiny", "fp32", "AdamW", "torch", "foreach"),
                 ("tiny", "fp32", "LARS", "pytorch-optimizer", "foreach"),
                 ("tiny", "fp32", "LARS", "pytorch-optimizer", "per-param"),
                 ("tiny", "fp32", "LAMB", "pytorch-optimizer", "clip,foreach"),
                 ("tiny", "fp32", "LAMB", "pytorch-optimizer", "clip,per-param")}
    # LAMB on the backends with kernels of the Adam base's ops.
    expected |= {("tiny", "fp32", "LAMB", backend, variant) for backend in timed & {"reference", "cpp"}
                 for variant in ("no-clip", "clip")}
    assert set(keys) == expected  # --quick skips torch.compile ...
    assert "torch.compile(reference)" in report["backends_unavailable"]  # ... and says so


def test_records_are_complete_and_consistent(run):
    report, *_ = run
    for r in report["records"]:
        if r["backend"] == "pytorch-optimizer" and r["error"]:
            pytest.importorskip("pytorch_optimizer")
        assert r["error"] is None, r
        for field in ("median_ms", "ci_low_ms", "ci_high_ms", "gbps", "fraction_of_copy", "fused_sgd_ms",
                      "ratio_to_fused_sgd", "ratio_ci_low", "ratio_ci_high"):
            assert isinstance(r[field], float) and math.isfinite(r[field]) and r[field] > 0, (field, r)
        assert isinstance(r["precise"], bool) and r["rejected_rounds"] >= 0
        # Every figure is a median of positive samples, and the interval holds it.
        assert r["samples"] >= 6 and len(r["samples_ms"]) == len(r["fused_sgd_samples_ms"]) == r["samples"]
        assert min(r["samples_ms"]) > 0 and r["min_ms"] == min(r["samples_ms"])
        assert r["median_ms"] == pytest.approx(np.median(r["samples_ms"]))
        assert r["ci_low_ms"] <= r["median_ms"] <= r["ci_high_ms"]
        # The ratio is the row's median over that of fused SGD timed in the same rounds.
        assert r["fused_sgd_ms"] == pytest.approx(np.median(r["fused_sgd_samples_ms"]))
        assert r["ratio_to_fused_sgd"] == pytest.approx(r["median_ms"] / r["fused_sgd_ms"])
        assert r["ratio_ci_low"] <= r["ratio_to_fused_sgd"] <= r["ratio_ci_high"]
        assert r["gbps"] == pytest.approx(r["bytes_per_step"] / r["median_ms"] / 1e6)
        per_element = BYTES_PER_ELEMENT.get((r["optimizer"], r["variant"]))
        if per_element is not None:
            assert r["bytes_per_step"] == per_element * TINY_NUMEL
        if r["optimizer"] == "CBLR":  # the closure's calls were timed inside the step and left out
            assert r["closure_calls"] == (2 if r["variant"] == "re-measure" else 1)
            assert r["closure_ms"] > 0 and r["with_closure_ms"] > r["median_ms"]
        if r["backend"] == "torch":
            assert r["speedup_vs_reference"] is None
        else:
            assert isinstance(r["speedup_vs_reference"], float)
        if r["backend"] == "reference":
            assert r["speedup_vs_reference"] == 1.0


def test_prints_the_table(run):
    _, json_path, stdout, _ = run
    assert "| SGD | torch | fused |" in stdout and "| LARS | reference | lag=0 |" in stdout
    assert "step ms [95% CI]" in stdout and "÷ fused SGD [95% CI]" in stdout
    assert str(json_path.with_suffix("")) in stdout


def test_microbenchmarks_run():
    """The pytest-benchmark suite runs (each benchmark once, untimed) on the tiny suite."""
    pytest.importorskip("pytest_benchmark")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "bench/benchmarks",
                           "--bench-suite", "tiny", "--benchmark-disable"],
                          cwd=ROOT, env=bench_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "error" not in proc.stdout



def test_every_pass_of_the_traffic_model_ran_and_its_bytes_add_up(run):
    """Each CPU record times its passes (bench/passes.py): every op the traffic model names
    ran in the profiled steps, the passes' bytes are the step's, and "other" closes the row."""
    report, *_ = run
    for r in report["records"]:
        passes = r["passes"]
        assert passes[-1]["op"] == "other" and passes[-1]["ms"] >= 0
        modelled = [p for p in passes if p["bytes"] is not None]
        assert sum(p["bytes"] for p in modelled) == r["bytes_per_step"], r
        for p in modelled:
            assert p["calls_per_step"] >= 1, (r["optimizer"], r["backend"], r["variant"], p["op"])
            assert p["ms"] > 0 and p["gbps"] == pytest.approx(p["bytes"] / p["ms"] / 1e6)
        if r["backend"] in ("reference", "cpp"):  # the package's steps are split into its ops
            assert all(p["op"] != "step" for p in modelled)


def test_gpt2_suite_has_gpt2_smalls_tensors_and_runs_by_its_short_name():
    """``--suite gpt2``: HF GPT2Model's 148 tensors and 124,439,808 parameters (the count
    HF reports for gpt2), by hand: wte 50257×768, wpe 1024×768, 12 blocks of two layer
    norms, c_attn 768×2304, c_proj 768×768, c_fc 768×3072, mlp c_proj 3072×768 (each with
    a bias), and ln_f."""
    from bench import suites
    from bench.__main__ import parse_args

    block = 2 * 2 * 768 + (768 * 2304 + 2304) + (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768)
    assert 50257 * 768 + 1024 * 768 + 12 * block + 2 * 768 == 124_439_808
    (name,) = parse_args(["--suite", "gpt2"]).suite
    suite = suites.get(name)
    assert suite is suites.get("gpt2-small") and (len(suite), suite.numel) == (148, 124_439_808)
    shapes = dict(suite.shapes)
    assert shapes["wte.weight"] == (50257, 768) and shapes["h.11.attn.c_attn.weight"] == (768, 2304)
    assert shapes["h.0.mlp.c_proj.weight"] == (3072, 768) and shapes["ln_f.bias"] == (768,)
    small = suites.get("gpt2", small=True)  # a CPU run's default size
    assert len(small) == 148 and small.name == "gpt2-small-small"
