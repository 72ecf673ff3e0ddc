"""``python -m bench --compare A.json B.json``: case by case, run B's median step
time over run A's, with a 95 % bootstrap interval (the runs share no rounds), and
the same for the rounds' step ÷ fused SGD (each run timed both in every round),
which holds better when the machine's speed differs between the runs."""
from __future__ import annotations

import json
from pathlib import Path

from . import stats
from .report import key

IDENTITY = ("device_name", "threads", "quick", "small", "cache_flush_bytes")


def _verdict(iv: stats.Interval) -> str:
    if iv.high < 1:
        return "faster"
    if iv.low > 1:
        return "slower"
    return "undecided (1 inside)"


def _ratios(record: dict) -> list:
    return [a / b for a, b in zip(record["samples_ms"], record["fused_sgd_samples_ms"])]


def compare(path_a: Path, path_b: Path) -> str:
    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    lines = [f"B ÷ A: B = {path_b}, A = {path_a} (< 1: B is faster)"]
    for field in IDENTITY:
        if a.get(field) != b.get(field):
            lines.append(f"note: the runs differ in {field}: A {a.get(field)!r}, B {b.get(field)!r}")
    lines += ["", "| suite | dtype | optimizer | backend | variant | A ms | B ms | B ÷ A, ms [95% CI] | "
                  "B ÷ A, ÷ fused SGD [95% CI] |",
              "|---|---|---|---|---|---:|---:|---:|---:|"]
    b_records = {key(r): r for r in b["records"] if r.get("samples_ms")}
    for ra in a["records"]:
        rb = b_records.get(key(ra))
        if not ra.get("samples_ms") or rb is None:
            continue
        ms = stats.unpaired_ratio_interval(rb["samples_ms"], ra["samples_ms"])
        cells = [*key(ra), f"{ra['median_ms']:.3f}", f"{rb['median_ms']:.3f}",
                 f"{ms.median:.3f} [{ms.low:.3f}, {ms.high:.3f}] {_verdict(ms)}"]
        if ra.get("fused_sgd_samples_ms") and rb.get("fused_sgd_samples_ms"):
            rel = stats.unpaired_ratio_interval(_ratios(rb), _ratios(ra))
            cells.append(f"{rel.median:.3f} [{rel.low:.3f}, {rel.high:.3f}] {_verdict(rel)}")
        else:
            cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
