"""``python -m bench``: time every optimizer implementation side by side on
real models' parameter shapes; print a table, write <device>.json and a PNG
chart per (suite, dtype) to ./bench-results/ (or --out).  See bench/README.md."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

# scipy (the intervals of bench/stats.py) comes with the [bench] extra, not with the package
if importlib.util.find_spec("scipy") is None:
    raise SystemExit('python -m bench needs scipy, from the bench extra: pip install --no-build-isolation -e ".[bench]"')

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cblr_ext  # noqa: E402
from cblr_ext.hyperparams import BACKENDS  # noqa: E402

from . import chart, compare, machine, report, runner, stats, suites, timing  # noqa: E402
from .cases import TRAFFIC, all_cases, find  # noqa: E402
from .clock import for_device as clock_for  # noqa: E402

# Outside the source tree by default (the cwd's); the committed reference runs are in bench/results/.
DEFAULT_OUT = Path("bench-results")
# The copy-bandwidth calibration at the start and at the end of a run.
CALIBRATION = timing.Budget(warmup=1, min_samples=stats.MIN_SAMPLES, max_samples=60, seconds=2.0)
# The copy of each step's bytes (the 100 % line of the same size), after each table.
SAME_BYTES_COPY = timing.Budget(warmup=1, min_samples=stats.MIN_SAMPLES, max_samples=60, seconds=0.3)


def _positive(convert):
    def parse(text):
        value = convert(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="about a minute: ResNet-50 at --small size, 1 s per case, fp32, no torch.compile")
    ap.add_argument("--suite", action="append", choices=list(suites.NAMES),
                    help=f"suite to run (repeatable; default: {', '.join(suites.DEFAULT_SUITES)})")
    ap.add_argument("--full", action="store_true",
                    help="every model suite at full size on a CPU too (by default a CPU run keeps ResNet-50 "
                         "full and scales the larger models down, so that it takes a few minutes)")
    ap.add_argument("--small", action="store_true",
                    help=f"model suites with widths / {suites.SMALL_DIVISOR} (~1/16 of the parameters)")
    ap.add_argument("--dtype", action="append", choices=list(runner.DTYPES),
                    help="parameter dtype (repeatable; default: fp32, plus bf16 where the device has native bf16)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", action="append", choices=[b for b in BACKENDS if b not in ("auto", "reference")],
                    help="fused cblr_ext backend to time (repeatable; default: every one available on the "
                         "device); the reference backend always runs")
    ap.add_argument("--optimizer", action="append",
                    help="time only this optimizer's cases, e.g. LAMB or AdamW (repeatable; fused SGD, the "
                         "baseline every case is paired with, always runs)")
    ap.add_argument("--threads", type=_positive(int), help="CPU threads of torch (default: torch's, i.e. the cores)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) cases")
    ap.add_argument("--case-seconds", type=_positive(float),
                    help="sampling budget per case in seconds (default: 10, 1 with --quick)")
    ap.add_argument("--launches", action="store_true",
                    help="count the GPU's kernels per step with torch.profiler (one more untimed step per case)")
    ap.add_argument("--compile-timeout", type=_positive(float),
                    help="seconds for compiling + timing one torch.compile case before it is recorded as failed "
                         "(default: 600 on CPU, where inductor takes minutes over a 161-tensor step, 300 on GPUs)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="time steps back to back, without evicting the caches before each (by default every "
                         "timed call starts cold, as a step after a forward and backward pass does)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="directory for the JSON and PNG files (default: ./bench-results in the current directory)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                    help="print, case by case, run B's times over run A's with 95%% intervals, and exit")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--distributed", action="store_true",
                    help="instead: each rule on ResNet-50's shapes sharded over 2 gloo ranks on this CPU against one "
                         "process (step time, collectives and their bytes per step; bench/distributed.py); with "
                         "--small at widths / 4")
    args = ap.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError as exc:
        ap.error(f"argument --device: {exc}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("argument --device: CUDA is not available in this torch build or on this machine")
    return args


def native_bf16(device: torch.device) -> bool:
    """bf16 arithmetic in hardware (CUDA bf16, or CPU AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return model.strip()


def git_revision() -> str | None:
    """The checkout's commit (+ "-dirty" with uncommitted changes), to tie results to code."""
    try:
        def git(*cmd):
            return subprocess.run(["git", *cmd], cwd=Path(__file__).parent, capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpp_kernel_isa():
    from cblr_ext.backends import cpp
    return cpp.kernel_isa()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _distributed(args) -> int:
    from . import distributed
    result = distributed.run(small=args.small)
    result.update(device=device_name(torch.device("cpu")), torch=torch.__version__,
                  date=datetime.date.today().isoformat(), load_average_before=machine.load_average())
    distributed.print_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "distributed-cpu.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare:
        print(compare.compare(*args.compare))
        return 0
    if args.distributed:
        return _distributed(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    budget = timing.QUICK if args.quick else timing.FULL
    if args.case_seconds:
        budget = dataclasses.replace(budget, seconds=args.case_seconds)
    compile_timeout = args.compile_timeout or (600.0 if device.type == "cpu" else 300.0)
    suite_names = args.suite or (suites.QUICK_SUITES if args.quick else
                                 suites.GPU_SUITES if device.type == "cuda" else suites.DEFAULT_SUITES)
    chosen = [suites.get(name, small=args.small or args.quick or (
        device.type == "cpu" and not args.full and name != "resnet50")) for name in dict.fromkeys(suite_names)]
    dtypes = list(dict.fromkeys(args.dtype or ["fp32"] + (["bf16"] if native_bf16(device) and not args.quick else [])))
    cases, unavailable = all_cases(device, compile_reference=not (args.quick or args.no_compile),
                                   only_backends=args.backend)
    if args.optimizer:
        cases = [c for c in cases if c.optimizer in args.optimizer or c.key == report.FUSED_SGD]

    load_start = machine.load_average()
    if (busy := machine.busy_at_start(load_start)) is not None:
        print(busy, file=sys.stderr)
    cpu = machine.CpuMeter()
    clock = clock_for(device)
    flush = None if args.warm_cache else timing.CacheFlush(device)
    copy_mb = 128 if args.quick else 512
    copy = timing.copy_bandwidth(device, copy_mb, CALIBRATION, clock, flush)
    meta = {
        "device": device.type, "device_name": device_name(device), "torch_version": torch.__version__,
        "cblr_ext_version": cblr_ext.__version__, "git_revision": git_revision(), "threads": torch.get_num_threads(),
        "python": platform.python_version(), "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "clock": type(clock).__name__, "quick": args.quick, "small": args.small or args.quick,
        "budget": vars(budget), "confidence": stats.CONFIDENCE,
        "cache_flush_bytes": flush.bytes if flush else 0, "copy_bandwidth": copy,
        "backends_unavailable": unavailable,
        "cpp_kernel_isa": cpp_kernel_isa() if device.type == "cpu" and "cpp" not in unavailable else None,
        "suites": {s.name: {"tensors": len(s), "numel": s.numel, "description": s.description} for s in chosen},
        "traffic_model": {f"{opt} {variant}".strip(): {"param_elements": t.param, "state_elements": t.state,
                                                        "counted": t.counted,
                                                        "passes": [dict(vars(p)) for p in t.passes]}
                          for (opt, variant), t in TRAFFIC.items()},
    }

    # Timed in turn with every case, itself included (on its own copies), so that every
    # row, fused SGD's too, comes from the same paired rounds.
    fused_sgd = find(cases, report.FUSED_SGD)
    records = []
    # A compilation that timed out on one suite is not retried on the next ones
    # (on CPU inductor takes minutes over the reference's per-layer kernels).
    compile_timed_out = {}
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    size = "-quick" if args.quick else "-small" if args.small else ""
    stem = slug(f"{device.type}-{meta['device_name']}-{meta['threads']}t") + size
    # Each record as it is made, so that a run cut short leaves what it measured.
    partial = args.out / f"{stem}.partial.jsonl"
    partial.write_text("")
    progress = tqdm(total=len(chosen) * len(dtypes) * len(cases), unit="case",
                    disable=args.quiet or not sys.stderr.isatty())
    for suite in chosen:
        for dtype_name in dtypes:
            dtype = runner.DTYPES[dtype_name]
            params, grad_sets = runner.make_tensors(suite, dtype, device)
            for case in cases:
                progress.set_description(f"{suite.name} {dtype_name} {case.optimizer} {case.backend} {case.variant}")
                try:
                    if case.isolated and (case.optimizer, case.variant) in compile_timed_out:
                        result = {"error": compile_timed_out[case.optimizer, case.variant]}
                    elif case.isolated:
                        result = runner.measure_isolated(case, fused_sgd, suite, dtype, device, budget,
                                                         compile_timeout, cold=flush is not None,
                                                         count_launches=args.launches)
                        if result.get("error", "").startswith("timed out"):
                            compile_timed_out[case.optimizer, case.variant] = (
                                f"skipped: timed out on {suite.name} {dtype_name} already")
                    else:
                        result = runner.measure(case, params, grad_sets, budget, device, flush, baseline=fused_sgd,
                                                count_launches=args.launches)
                except Exception as exc:  # one failing implementation must not end the run
                    result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                records.append(_record(suite, dtype_name, dtype, case, result))
                with partial.open("a") as log:
                    log.write(json.dumps(report.finite(records[-1]), allow_nan=False) + "\n")
                progress.update()
            del params, grad_sets
            report.same_bytes_copies(records[-len(cases):], lambda nbytes: timing.copy_time(
                device, nbytes, SAME_BYTES_COPY, clock, flush)["median_ms"])
    progress.close()

    meta["machine"] = {"cpu_count": os.cpu_count(), "load_average_start": load_start,
                       "load_average_end": machine.load_average(), **cpu.read(), "copy_start": copy,
                       "copy_end": timing.copy_bandwidth(device, copy_mb, CALIBRATION, clock, flush)}
    warnings = machine.warnings(meta["machine"])
    meta["machine"]["warnings"] = warnings
    report.derive(records, copy["gbps"])
    report.write_json(args.out / f"{stem}.json", meta, records)
    partial.unlink()
    charts = []
    for suite_name, dtype_name in dict.fromkeys((r["suite"], r["dtype"]) for r in records):
        charts.append(args.out / f"{stem}-{suite_name}-{dtype_name}.png")
        chart.chart(charts[-1], meta, [r for r in records if (r["suite"], r["dtype"]) == (suite_name, dtype_name)],
                    budget.target)
    print(f"{meta['device_name']}, torch {meta['torch_version']}, {meta['threads']} threads; "
          f"copy bandwidth {copy['gbps']:.1f} GB/s [{copy['gbps_low']:.1f}, {copy['gbps_high']:.1f}] at the start, "
          f"{meta['machine']['copy_end']['gbps']:.1f} GB/s at the end")
    for name, why in unavailable.items():
        print(f"not benchmarked: {name}: {why}")
    print(report.table(records, budget.target))
    for r in records:
        if r.get("rejected_rounds"):
            print(f"measurement errors, discarded and repeated: {' '.join(report.key(r))}: "
                  f"{r['rejected_rounds']} rounds with an impossible time (e.g. {r['rejected'][0]['measured']})")
    for line in warnings:
        print(f"\n{line}")
    print(f"\nwrote {args.out / stem}.json and {len(charts)} chart(s): {', '.join(c.name for c in charts)}")
    return 0


def _record(suite, dtype_name, dtype, case, result) -> dict:
    record = {"suite": suite.name, "dtype": dtype_name, "optimizer": case.optimizer, "backend": case.backend,
              "variant": case.variant, "suite_tensors": len(suite), "suite_numel": suite.numel,
              "bytes_per_step": case.traffic.bytes_per_step(suite.numel, dtype, case.state_dtype(dtype)),
              "state_dtype": str(case.state_dtype(dtype)).removeprefix("torch."),
              "compare_to": case.compare_to, "error": result.get("error")}
    for field in report.TIMING_FIELDS + report.PAIRED_FIELDS:
        record[field] = result.get(field)
    for field in ("first_call_s", "closure_ms", "closure_calls", "with_closure_ms", "passes"):
        if field in result:
            record[field] = result[field]
    for field in report.LAUNCH_FIELDS:
        record[field] = result.get(field)
    for field in report.DERIVED_FIELDS + report.SAME_BYTES_FIELDS:
        record[field] = None
    return record


if __name__ == "__main__":
    sys.exit(main())
