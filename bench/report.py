"""Derived figures (speed-ups, GB/s), the printed table and the JSON file."""
from __future__ import annotations

import json
import math
from pathlib import Path

# A record is one (suite, dtype, optimizer, backend, variant); these identify it.
KEY_FIELDS = ("suite", "dtype", "optimizer", "backend", "variant")
TIMING_FIELDS = ("median_ms", "ci_low_ms", "ci_high_ms", "min_ms", "samples", "samples_ms", "precise",
                 "rejected_rounds", "rejected", "other_cpu_cores", "steal_cores")
PAIRED_FIELDS = ("fused_sgd_ms", "fused_sgd_ci_low_ms", "fused_sgd_ci_high_ms", "fused_sgd_samples_ms",
                 "ratio_to_fused_sgd", "ratio_ci_low", "ratio_ci_high")
DERIVED_FIELDS = ("gbps", "fraction_of_copy", "speedup_vs_reference")
# A device-to-device copy of the step's bytes (the 100 % line of the same size) and its
# time over the step's; the GPU's kernels per step (--launches).
SAME_BYTES_FIELDS = ("copy_same_bytes_ms", "fraction_of_copy_same_bytes")
LAUNCH_FIELDS = ("kernels_per_step", "memory_ops_per_step")
FUSED_SGD = ("SGD", "torch", "fused")
WIDE = "*"  # marks a figure whose interval stayed wider than the target


def key(record: dict) -> tuple:
    return tuple(record[k] for k in KEY_FIELDS)


def derive(records: list, copy_gbps: float) -> None:
    """Fill the derived figures of the records of one run in place: GB/s from the
    traffic model, and the speed-up over the reference backend of the same
    (optimizer, variant)."""
    ok = {key(r): r for r in records if r["median_ms"] is not None}
    for r in records:
        ref = r.pop("compare_to")
        if r["median_ms"] is None:
            continue
        r["gbps"] = r["bytes_per_step"] / (r["median_ms"] * 1e-3) / 1e9
        r["fraction_of_copy"] = r["gbps"] / copy_gbps
        ref = ok.get((r["suite"], r["dtype"], ref[0], "reference", ref[1])) if ref else None
        r["speedup_vs_reference"] = ref["median_ms"] / r["median_ms"] if ref else None


def same_bytes_copies(records: list, copy_ms) -> None:
    """Fill the same-bytes copy fields of one (suite, dtype)'s records in place;
    ``copy_ms(bytes)`` times a copy moving that many bytes (each size once)."""
    times = {}
    for r in records:
        if r["median_ms"] is None:
            continue
        if r["bytes_per_step"] not in times:
            times[r["bytes_per_step"]] = copy_ms(r["bytes_per_step"])
        r["copy_same_bytes_ms"] = times[r["bytes_per_step"]]
        r["fraction_of_copy_same_bytes"] = r["copy_same_bytes_ms"] / r["median_ms"]


def _interval(median, low, high, spec, target=None) -> str:
    if median is None:
        return "–"
    text = f"{median:{spec}} [{low:{spec}}, {high:{spec}}]"
    wide = target is not None and max(median - low, high - median) > target * median
    return text + (f" {WIDE}" if wide else "")


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def table(records: list, target: float) -> str:
    """A Markdown table per (suite, dtype), ready to paste into a README."""
    lines = []
    groups = dict.fromkeys((r["suite"], r["dtype"], r["suite_tensors"], r["suite_numel"]) for r in records)
    for suite, dtype, tensors, numel in groups:
        lines += [f"\n**{suite}** ({tensors} tensors, {numel:,} parameters, {dtype})\n",
                  "| optimizer | backend | variant | step ms [95% CI] | fused SGD ms in turn | ÷ fused SGD [95% CI]"
                  " | × reference | GB/s | % copy |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        rows = [r for r in records if (r["suite"], r["dtype"]) == (suite, dtype)]
        for r in rows:
            head = f"| {r['optimizer']} | {r['backend']} | {r['variant']} |"
            if r["median_ms"] is None:
                lines.append(f"{head} {r['error']} | | | | | |")
                continue
            lines.append(
                f"{head} {_interval(r['median_ms'], r['ci_low_ms'], r['ci_high_ms'], '.3f', target)}"
                f" | {_fmt(r.get('fused_sgd_ms'), '.3f')}"
                f" | {_interval(r.get('ratio_to_fused_sgd'), r.get('ratio_ci_low'), r.get('ratio_ci_high'), '.2f', target)}"
                f" | {_fmt(r['speedup_vs_reference'], '.2f')} | {r['gbps']:.1f} | {100 * r['fraction_of_copy']:.0f} |")
        if any(WIDE in line for line in lines[-len(rows):]):
            lines.append(f"\n{WIDE} interval wider than ±{100 * target:.0f} % of the median: the case's time "
                         "budget ran out first.")
    return "\n".join(lines)


def finite(value):
    """JSON has no NaN: an interval that could not be formed is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, meta: dict, records: list) -> None:
    path.write_text(json.dumps(finite({**meta, "records": records}), indent=1, allow_nan=False) + "\n")
