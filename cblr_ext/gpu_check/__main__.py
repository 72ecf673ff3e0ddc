"""python -m cblr_ext.gpu_check OUT_DIR: see cblr_ext/gpu_check/__init__.py and docs/gpu_check.md."""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

from . import report, runner
from .stages import STAGES, Context, read_machine

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv, stages):
    ap = argparse.ArgumentParser(prog="python -m cblr_ext.gpu_check", description=__doc__)
    ap.add_argument("out", type=Path, help="directory for the JSON, Markdown, junit XML and logs")
    ap.add_argument("--dry-run", action="store_true", help="the plumbing only, as without a GPU")
    ap.add_argument("--only", action="append", choices=[s.name for s in stages],
                    help="run only this stage (repeatable), e.g. to rerun one on a machine where the build was "
                         "done; stages it needs count as done")
    return ap.parse_args(argv)


def git_revision():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def blocked_by(stage, results):
    """Why ``stage`` cannot run: a stage it needs ran and did not pass (None: it can)."""
    for name in stage.needs:
        done = results.get(name)
        if done is not None and done["status"] != runner.PASSED and done.get("reason") != "not selected (--only)":
            return f"needs {name}, which {done['status']}"
    return None


def main(argv=None, stages=STAGES) -> int:
    args = parse_args(argv, stages)
    if not (REPO / "tests").is_dir() or not (REPO / "bench").is_dir():
        sys.exit(f"the GPU check runs the checkout's tests/ and bench/: none at {REPO}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    check = {"out": str(out), "dry_run": True, "started": datetime.datetime.now().isoformat(timespec="seconds"),
             "budget_s": sum(s.limit_s for s in stages), "wall_s": 0.0, "git_revision": git_revision(),
             "command": " ".join(["python -m cblr_ext.gpu_check", *(argv if argv is not None else sys.argv[1:])]),
             "machine": {}, "stages": []}
    results = {}
    for stage in stages:
        machine = read_machine(out)
        check.update(machine=machine, dry_run=args.dry_run or not machine.get("cuda_available", False))
        if args.only and stage.name not in args.only:
            result = runner.skipped(stage, "not selected (--only)")
        elif (why := blocked_by(stage, results)) is not None:
            result = runner.skipped(stage, why)
        else:
            ctx = Context(out=out, repo=REPO, python=sys.executable, machine=machine, stage=stage.name)
            print(f"gpu_check: {stage.name} (limit {stage.limit_s:g} s) ...", flush=True)
            result = report.collect(runner.run(stage, ctx, check["dry_run"]), out)
        results[stage.name] = result
        check["stages"].append(result)
        check["wall_s"] = round(time.monotonic() - start, 1)
        report.write(out, check)
    print(report.verdict(check))
    return 0 if all(s["status"] in (runner.PASSED, runner.SKIPPED) for s in check["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
