"""Run one stage: its commands in a subprocess session of their own, output to
OUT_DIR/<stage>.log, killed with everything they started at the stage's limit, so a
hang or a crash costs that stage only."""
from __future__ import annotations

import os
import signal
import subprocess
import time

from .stages import BASE_ENV, Context, Stage

PASSED, FAILED, TIMED_OUT, CRASHED, SKIPPED = "passed", "failed", "timed out", "crashed", "skipped"


def skipped(stage: Stage, reason: str) -> dict:
    return {"name": stage.name, "what": stage.what, "limit_s": stage.limit_s, "status": SKIPPED, "reason": reason,
            "seconds": 0.0, "log": None}


def _kill_session(proc):
    """The stage's process and whatever it started (one session, one process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(stage: Stage, ctx: Context, dry_run: bool) -> dict:
    builder = stage.builder(dry_run)
    if builder is None:
        return skipped(stage, stage.skip_reason)
    command = builder(ctx)
    log = ctx.out / f"{stage.name}.log"
    env = {**os.environ, **BASE_ENV, **command.env}
    result = {"name": stage.name, "what": stage.what, "limit_s": stage.limit_s, "form": "dry" if dry_run else "gpu",
              "env": command.env, "commands": [" ".join(argv) for argv in command.steps], "log": log.name}
    start = time.monotonic()
    deadline = start + stage.limit_s
    status, reason = PASSED, None
    with open(log, "wb") as out:
        for argv in command.steps:
            out.write(f"$ {' '.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(argv, cwd=ctx.repo, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                code = proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                _kill_session(proc)
                status, reason = TIMED_OUT, f"killed at its {stage.limit_s:g} s limit"
                break
            _kill_session(proc)  # anything it left running
            if code < 0:
                status, reason = CRASHED, f"killed by {signal.Signals(-code).name}"
                break
            if code != 0:
                status, reason = FAILED, f"exit code {code}"
                break
    result.update(status=status, reason=reason, seconds=round(time.monotonic() - start, 2))
    return result
