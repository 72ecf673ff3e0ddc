"""The machine-state warnings and ``--compare`` on synthetic runs (no timing)."""
import json

import numpy as np
import pytest

from bench import machine
from bench.compare import compare


def copy(gbps, low, high):
    return {"gbps": gbps, "gbps_low": low, "gbps_high": high}


def state(**changes):
    quiet = {"cpu_count": 2, "load_average_start": 0.1, "load_average_end": 1.9, "other_cpu_cores": 0.05,
             "copy_start": copy(40.0, 39.0, 41.0), "copy_end": copy(41.0, 40.0, 42.0)}
    return {**quiet, **changes}


def test_a_quiet_machine_gives_no_warning():
    # The load average at the end includes the benchmark itself: it does not count.
    assert machine.warnings(state()) == []


@pytest.mark.parametrize("changes", [{"load_average_start": 1.2}, {"other_cpu_cores": 0.9}])
def test_other_work_is_a_busy_warning(changes):
    (warning,) = machine.warnings(state(**changes))
    assert warning.startswith("WARNING: the machine was busy")


def test_a_copy_bandwidth_drift_is_a_warning():
    (warning,) = machine.warnings(state(copy_end=copy(30.0, 29.0, 31.0)))
    assert "drifted" in warning and "40.0 GB/s [39.0, 41.0]" in warning and "30.0 GB/s" in warning
    # A change within the intervals' overlap is no drift.
    assert machine.warnings(state(copy_end=copy(35.0, 30.0, 39.5))) == []


def test_other_processes_cpu_use_is_measured():
    reading = machine.CpuMeter().read()
    assert reading["other_cpu_cores"] is None or reading["other_cpu_cores"] >= 0


def run_file(path, ms, sgd_ms, **meta):
    record = {"suite": "resnet50", "dtype": "fp32", "optimizer": "LARS", "backend": "cpp", "variant": "lag=0",
              "median_ms": float(np.median(ms)), "samples_ms": list(ms), "fused_sgd_samples_ms": list(sgd_ms)}
    path.write_text(json.dumps({"device_name": "x", "threads": 2, **meta, "records": [record]}))
    return path


def test_compare_prints_the_ratio_of_two_runs(tmp_path):
    rng = np.random.default_rng(0)
    sgd = 10 * (1 + 0.01 * rng.standard_normal(30))
    a = run_file(tmp_path / "a.json", 15 * (1 + 0.01 * rng.standard_normal(30)), sgd)
    # B: the machine is 2x slower (fused SGD too) and the step 2x slower with it.
    b_ms = 30 * (1 + 0.01 * rng.standard_normal(30))
    b = run_file(tmp_path / "b.json", b_ms, 2 * sgd, threads=1)
    text = compare(a, b)
    assert "differ in threads" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| resnet50")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["resnet50", "fp32", "LARS", "cpp", "lag=0"]
    expected = np.median(b_ms) / json.loads(a.read_text())["records"][0]["median_ms"]
    assert cells[7].startswith(f"{expected:.3f} [") and cells[7].endswith("slower")
    # Over fused SGD timed in turn the two runs agree: the interval contains 1.
    assert cells[8].startswith("1.0") or cells[8].startswith("0.99")
    assert cells[8].endswith("undecided (1 inside)")
