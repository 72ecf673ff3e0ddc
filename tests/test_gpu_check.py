"""The GPU check (python -m cblr_ext.gpu_check) on the CPU: a stage that fails and one
that hangs (killed at a tiny limit, with what it started) leave the other stages'
results in OUT_DIR (JSON, Markdown, junit XML, logs) and the verdict names them; the
dry run exits 0 and writes its files; the build targets the present GPU alone; the
stage table and docs/gpu_check.md agree.  The launch counter runs on a GPU only."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cblr_ext.gpu_check import stages as st
from cblr_ext.gpu_check.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def python(code):
    return lambda ctx: st.Command([[PY, "-c", code]])


def dead(pid, wait_s=10.0):
    """The process is gone or a zombie (killed, not yet reaped by its new parent)."""
    give_up = time.monotonic() + wait_s
    while time.monotonic() < give_up:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def failing_and_hanging(tmp_path, capsys):
    marker, pids = tmp_path / "first.txt", tmp_path / "pids.txt"
    test_file = tmp_path / "test_three.py"
    test_file.write_text("import pytest\n\ndef test_ok():\n    assert 1 + 1 == 2\n\n"
                         "def test_wrong():\n    assert 1 + 1 == 3\n\n"
                         "def test_later():\n    pytest.skip('not here')\n")
    hang = ("import os, subprocess, sys, time\n"
            f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
            "time.sleep(600)\n")
    table = (
        st.Stage("first", "writes a file", 60, None, python(f"open({str(marker)!r}, 'w').write('ran')")),
        st.Stage("fails", "exits 3", 60, None, python("import sys; print('boom'); sys.exit(3)")),
        st.Stage("hangs", "sleeps, with a child", 2, None, python(hang)),
        st.Stage("tests", "pytest: one pass, one failure, one skip", 120, None,
                 st.pytest(str(test_file))),
        st.Stage("after-fails", "needs the failed stage", 60, None, python("pass"), needs=("fails",)),
        st.Stage("gpu-only", "has no dry form", 60, python("pass"), None, skip_reason="no GPU here"),
    )
    out = tmp_path / "out"
    code = main([str(out)], stages=table)
    return code, out, marker, pids, capsys.readouterr().out


def test_a_failing_and_a_hanging_stage_leave_the_other_stages_results(failing_and_hanging):
    code, out, marker, _, _ = failing_and_hanging
    assert code == 1
    check = json.loads((out / "gpu_check.json").read_text())
    by_name = {s["name"]: s for s in check["stages"]}
    assert [s["name"] for s in check["stages"]] == ["first", "fails", "hangs", "tests", "after-fails", "gpu-only"]
    assert by_name["first"]["status"] == "passed" and marker.read_text() == "ran"
    assert by_name["fails"]["status"] == "failed" and by_name["fails"]["reason"] == "exit code 3"
    assert "boom" in (out / "fails.log").read_text()
    # the stage after the hang ran: pytest's counts from its junit XML
    tests = by_name["tests"]
    assert tests["status"] == "failed" and tests["junit"] == "tests.xml" and (out / "tests.xml").is_file()
    assert {k: tests["tests"][k] for k in ("tests", "failures", "errors", "skipped")} == \
        {"tests": 3, "failures": 1, "errors": 0, "skipped": 1}
    assert [name.split("::")[-1] for name in tests["tests"]["failed"]] == ["test_wrong"]
    assert by_name["after-fails"] == {**by_name["after-fails"], "status": "skipped",
                                      "reason": "needs fails, which failed"}
    assert by_name["gpu-only"]["status"] == "skipped" and by_name["gpu-only"]["reason"] == "no GPU here"
    summary = (out / "gpu_check.md").read_text()
    for name, status in (("first", "passed"), ("fails", "failed"), ("hangs", "timed out"), ("tests", "failed")):
        assert re.search(rf"^\| {name} \| {status}", summary, re.MULTILINE), name
    assert "`" + tests["tests"]["failed"][0] + "`" in summary


def test_a_hanging_stage_is_killed_at_its_limit_with_what_it_started(failing_and_hanging):
    _, out, _, pids, _ = failing_and_hanging
    hangs = next(s for s in json.loads((out / "gpu_check.json").read_text())["stages"] if s["name"] == "hangs")
    assert hangs["status"] == "timed out" and hangs["reason"] == "killed at its 2 s limit"
    assert hangs["seconds"] >= 2
    stage_pid, child_pid = map(int, pids.read_text().split())
    assert dead(stage_pid) and dead(child_pid)


def test_the_verdict_names_what_failed_and_what_timed_out(failing_and_hanging):
    *_, printed = failing_and_hanging
    verdict = printed[printed.index("GPU check"):]
    assert "fails failed: exit code 3" in verdict
    assert "hangs timed out: killed at its 2 s limit" in verdict
    assert "tests failed: exit code 1; failed: " in verdict and "test_wrong" in verdict
    assert "verdict: FAILED: 1 of 4 stages that ran passed, 2 skipped" in verdict
    assert len(verdict.splitlines()) <= 40  # one screen


def test_the_dry_run_exits_0_and_writes_its_files(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([PY, "-m", "cblr_ext.gpu_check", str(out), "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = json.loads((out / "gpu_check.json").read_text())
    assert check["dry_run"] is True and check["budget_s"] == st.BUDGET_S
    by_name = {s["name"]: s for s in check["stages"]}
    assert list(by_name) == [s.name for s in st.STAGES]
    for stage in st.STAGES:
        result = by_name[stage.name]
        if stage.dry is None:
            assert (result["status"], result["reason"]) == ("skipped", "no GPU"), result
        else:
            assert (result["status"], result["form"]) == ("passed", "dry"), result
            assert (out / result["log"]).is_file()
    assert json.loads((out / "probe.json").read_text())["torch"] == torch.__version__
    triton_tests = by_name["triton-tests"]["tests"]
    assert triton_tests["tests"] > triton_tests["skipped"] and triton_tests["failures"] == triton_tests["errors"] == 0
    bench = {(r["optimizer"], r["backend"], r["variant"]): r for r in by_name["bench-resnet50"]["bench"]}
    assert bench["SGD", "torch", "fused"]["error"] is None and bench["LARS", "cpp", "lag=0"]["median_ms"] > 0
    assert "DRY RUN" in proc.stdout and "verdict: PASSED" in proc.stdout
    assert (out / "gpu_check.md").read_text().startswith("# GPU check (dry run)")


def test_the_build_targets_the_present_gpu_only_with_every_core_and_downloads_nothing(tmp_path):
    machine = {"gpu": {"capability": [9, 0]}, "cpu_count": 16}
    assert st.build_env(machine) == {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "16"}
    assert st.arch_list((10, 0)) == "10.0" and st.arch_list((8, 6)) == "8.6"
    command = st.install(st.Context(out=tmp_path, repo=ROOT, python=PY, machine=machine, stage="build"))
    pip, check = command.steps
    assert pip[:4] == [PY, "-m", "pip", "install"] and "--no-index" in pip and "--no-build-isolation" in pip
    assert check[-2:] == ["--require", "cuda"]


def test_the_stage_limits_fit_the_budget_and_match_the_docs():
    assert st.BUDGET_S == sum(s.limit_s for s in st.STAGES) <= 8 * 60
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| (\d+) \|", (ROOT / "docs" / "gpu_check.md").read_text(), re.MULTILINE)
    assert [(name, float(limit)) for name, limit in rows] == [(s.name, s.limit_s) for s in st.STAGES]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts a GPU's kernels")
def test_kernel_launches_of_known_steps():
    from bench import launches
    from bench.cases import Step
    device = torch.device("cuda")
    xs = [torch.zeros(1000, device=device) for _ in range(3)]
    assert launches.per_step(Step(lambda: xs[0].add_(1)), device) == {"kernels_per_step": 1,
                                                                      "memory_ops_per_step": 0}
    assert launches.per_step(Step(lambda: [x.add_(1) for x in xs]), device)["kernels_per_step"] == 3

    def closure():
        xs[1].mul_(2)
        xs[2].mul_(2)

    def step_with(c):  # two closure calls around one kernel of the step's own
        c()
        xs[0].add_(1)
        c()
    step = Step(lambda: step_with(closure), closure, step_with)
    assert launches.per_step(step, device)["kernels_per_step"] == 1
    assert launches.per_step(Step(lambda: None), torch.device("cpu")) is None
