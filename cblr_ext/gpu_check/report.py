"""The check's files and its verdict: OUT_DIR/gpu_check.json (every stage's result, the
machine, the pytest counts, the bench figures), OUT_DIR/gpu_check.md (the same as
tables) and the one-screen verdict printed at the end.  Written again after every
stage, so a check cut short still leaves the stages done so far."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from .runner import FAILED, PASSED, SKIPPED

JSON_NAME, MARKDOWN_NAME = "gpu_check.json", "gpu_check.md"
# The bench figures the summary shows (bench/README.md, "The JSON").
BENCH_COLUMNS = (("dtype", "dtype", None), ("optimizer", "optimizer", None), ("backend", "backend", None),
                 ("variant", "variant", None), ("median_ms", "step ms", ".3f"),
                 ("ratio_to_fused_sgd", "÷ fused SGD", ".2f"), ("fraction_of_copy_same_bytes", "% copy", "%"),
                 ("kernels_per_step", "kernels/step", "d"))


def junit_counts(path: Path):
    """{tests, failures, errors, skipped, failed: [test ids], skip_reasons: {reason: n}} of a
    pytest junit XML file, or None if there is none."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = Counter()
    failed, reasons = [], Counter()
    for case in root.iter("testcase"):
        counts["tests"] += 1
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is None:
                continue
            counts[{"failure": "failures", "error": "errors", "skipped": "skipped"}[kind]] += 1
            if kind == "skipped":
                reasons[(element.get("message") or "").strip()[:200]] += 1
            else:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    return {"tests": counts["tests"], "failures": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"], "failed": failed, "skip_reasons": dict(reasons.most_common())}


def bench_records(folder: Path):
    """The records of the bench runs in ``folder``: the finished JSON files, else the
    records a run cut short had written so far (``*.partial.jsonl``)."""
    records = []
    if not folder.is_dir():
        return records
    for path in sorted(folder.glob("*.json")):
        records += json.loads(path.read_text()).get("records", [])
    if not records:
        for path in sorted(folder.glob("*.partial.jsonl")):
            records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def collect(result: dict, out: Path) -> dict:
    """The stage's result with what its files say: pytest counts, bench records."""
    junit = junit_counts(out / f"{result['name']}.xml")
    if junit is not None:
        result["junit"] = f"{result['name']}.xml"
        result["tests"] = junit
        if result["status"] == PASSED and junit["tests"] == junit["skipped"]:
            result.update(status=FAILED, reason="no test ran (all skipped or none collected)")
    records = bench_records(out / result["name"])
    if records:
        result["bench"] = [{k: r.get(k) for k in ("suite", "error", *[c[0] for c in BENCH_COLUMNS])}
                           for r in records]
    return result


def write(out: Path, check: dict) -> None:
    (out / JSON_NAME).write_text(json.dumps(check, indent=1, allow_nan=False, default=str) + "\n")
    (out / MARKDOWN_NAME).write_text(markdown(check))


def machine_line(check: dict) -> str:
    m = check.get("machine") or {}
    gpu = m.get("gpu")
    where = (f"{gpu['name']} (sm_{''.join(map(str, gpu['capability']))}, {gpu['multiprocessors']} SMs, "
             f"{gpu['memory_gib']:.0f} GiB)") if gpu else "no GPU"
    return (f"{where}; torch {m.get('torch')} (CUDA {m.get('torch_cuda')}), triton {m.get('triton')}, "
            f"nvcc {m.get('nvcc')}, {m.get('cpu_count')} cores, Python {m.get('python')}")


def _tests_text(stage: dict) -> str:
    t = stage.get("tests")
    if not t:
        return ""
    ran = t["tests"] - t["skipped"]
    return f"{ran - t['failures'] - t['errors']}/{ran} passed, {t['skipped']} skipped"


def _status_text(stage: dict) -> str:
    text = stage["status"] + (" (CPU form)" if stage.get("form") == "dry" else "")
    return text + (f": {stage['reason']}" if stage.get("reason") else "")


def _cell(value, spec):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if spec == "%":
        return f"{100 * value:.0f}"
    return format(value, spec) if spec else str(value)


def markdown(check: dict) -> str:
    lines = [f"# GPU check{' (dry run)' if check['dry_run'] else ''}", "",
             f"{machine_line(check)}; commit {check.get('git_revision')}; {check['started']}; "
             f"{check['wall_s']:.0f} s of the {check['budget_s']:.0f} s budget.", "",
             "| stage | status | s / limit | tests | what |", "|---|---|---:|---|---|"]
    for s in check["stages"]:
        lines.append(f"| {s['name']} | {_status_text(s)} | {s['seconds']:.0f} / {s['limit_s']:g} | "
                     f"{_tests_text(s)} | {s['what']} |")
    for s in check["stages"]:
        t = s.get("tests") or {}
        if t.get("failed"):
            lines += ["", f"## {s['name']}: failed tests", ""] + [f"- `{name}`" for name in t["failed"]]
        if t.get("skip_reasons"):
            lines += ["", f"## {s['name']}: skip reasons", ""] + [f"- {n} × {r}" for r, n in t["skip_reasons"].items()]
        if s.get("bench"):
            suite = s["bench"][0]["suite"]
            lines += ["", f"## {s['name']}: {suite} (% copy: a device-to-device copy of the same bytes = 100)", "",
                      "| " + " | ".join(c[1] for c in BENCH_COLUMNS) + " | error |",
                      "|" + "---|" * (len(BENCH_COLUMNS) + 1)]
            lines += ["| " + " | ".join(_cell(r.get(k), spec) for k, _, spec in BENCH_COLUMNS)
                      + f" | {r.get('error') or ''} |" for r in s["bench"]]
    return "\n".join(lines) + "\n"


def verdict(check: dict) -> str:
    """One screen: the machine, a line per stage, and what failed, timed out or crashed."""
    lines = [f"GPU check{' — DRY RUN (no GPU): GPU stages skipped' if check['dry_run'] else ''}",
             machine_line(check), "",
             f"{'stage':18} {'status':10} {'s / limit':>11}  tests or why skipped"]
    for s in check["stages"]:
        status = s["status"] + ("*" if s.get("form") == "dry" else "")
        note = s["reason"] if s["status"] == SKIPPED else _tests_text(s)
        lines.append(f"{s['name']:18} {status:10} {s['seconds']:5.0f} / {s['limit_s']:<4g}  {note}")
    bad = [s for s in check["stages"] if s["status"] not in (PASSED, SKIPPED)]
    lines.append("")
    if check["dry_run"]:
        lines.append("* run in its CPU form; skipped stages need a GPU")
    for s in bad:
        failed = (s.get("tests") or {}).get("failed") or []
        more = f"; failed: {', '.join(failed[:3])}{' …' if len(failed) > 3 else ''}" if failed else ""
        lines.append(f"{s['name']} {s['status']}: {s.get('reason')}{more} (log: {s.get('log')})")
    ran = [s for s in check["stages"] if s["status"] != SKIPPED]
    lines.append(f"verdict: {'FAILED' if bad else 'PASSED'}: {len(ran) - len(bad)} of {len(ran)} stages that ran "
                 f"passed, {len(check['stages']) - len(ran)} skipped; {check['wall_s']:.0f} s "
                 f"(budget {check['budget_s']:.0f} s)")
    lines.append(f"files in {check['out']}: {JSON_NAME}, {MARKDOWN_NAME}, <stage>.xml (pytest junit), <stage>.log")
    return "\n".join(lines)
