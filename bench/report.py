"""Derived figures (speed-ups, GB/s), the printed table, the JSON file and the chart."""
from __future__ import annotations

import json
from pathlib import Path

# A record is one (suite, dtype, optimizer, backend, variant); these identify it.
KEY_FIELDS = ("suite", "dtype", "optimizer", "backend", "variant")
TIMING_FIELDS = ("median_ms", "q1_ms", "q3_ms", "iqr_ms", "min_ms", "samples")
DERIVED_FIELDS = ("gbps", "fraction_of_copy", "speedup_vs_reference", "ratio_to_fused_sgd")
FUSED_SGD = ("SGD", "torch", "fused")
# Chart colours by backend; every other (fused) cblr_ext backend is "fused".
BAR_COLORS = {"torch": "tab:gray", "pytorch-optimizer": "darkgray", "reference": "lightsteelblue",
              "torch.compile(reference)": "tab:orange", "fused": "tab:blue"}


def derive(records: list, copy_gbps: float) -> None:
    """Fill the derived figures of the records of one run in place: GB/s from the
    traffic model, speed-up over the reference backend of the same (optimizer,
    variant), and step time relative to fused SGD on the same suite and dtype (the
    fused SGD times taken in turn with the case, where there are)."""
    ok = {tuple(r[k] for k in KEY_FIELDS): r for r in records if r["median_ms"] is not None}
    for r in records:
        if r["median_ms"] is None:
            continue
        seconds = r["median_ms"] * 1e-3
        r["gbps"] = r["bytes_per_step"] / seconds / 1e9
        r["fraction_of_copy"] = r["gbps"] / copy_gbps
        ref = r.pop("compare_to")
        ref = ok.get((r["suite"], r["dtype"], ref[0], "reference", ref[1])) if ref else None
        r["speedup_vs_reference"] = ref["median_ms"] / r["median_ms"] if ref else None
        # Fused SGD timed in turn with this case where it was (runner.measure), else its own record.
        sgd = ok.get((r["suite"], r["dtype"]) + FUSED_SGD)
        sgd_ms = r.get("fused_sgd_ms") or (sgd["median_ms"] if sgd else None)
        r["ratio_to_fused_sgd"] = r["median_ms"] / sgd_ms if sgd_ms else None
    for r in records:
        r.pop("compare_to", None)


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def table(records: list) -> str:
    """A Markdown table per (suite, dtype), ready to paste into a README."""
    lines = []
    groups = dict.fromkeys((r["suite"], r["dtype"], r["suite_tensors"], r["suite_numel"]) for r in records)
    for suite, dtype, tensors, numel in groups:
        lines += [f"\n**{suite}** ({tensors} tensors, {numel:,} parameters, {dtype})\n",
                  "| optimizer | backend | variant | step ms (median) | IQR ms | × reference | ÷ fused SGD | GB/s | % copy |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in records:
            if (r["suite"], r["dtype"]) != (suite, dtype):
                continue
            head = f"| {r['optimizer']} | {r['backend']} | {r['variant']} |"
            if r["median_ms"] is None:
                lines.append(f"{head} {r['error']} | | | | | |")
                continue
            lines.append(f"{head} {r['median_ms']:.3f} | {r['iqr_ms']:.3f} | {_fmt(r['speedup_vs_reference'], '.2f')}"
                         f" | {_fmt(r['ratio_to_fused_sgd'], '.2f')} | {r['gbps']:.1f}"
                         f" | {100 * r['fraction_of_copy']:.0f} |")
    return "\n".join(lines)


def write_json(path: Path, meta: dict, records: list) -> None:
    path.write_text(json.dumps({**meta, "records": records}, indent=1) + "\n")


def chart(path: Path, meta: dict, records: list) -> None:
    """Step time relative to fused SGD, one panel per (suite, dtype), log scale."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups = list(dict.fromkeys((r["suite"], r["dtype"]) for r in records))
    ok = [r for r in records if r["ratio_to_fused_sgd"] is not None]
    labels = list(dict.fromkeys(f"{r['optimizer']} {r['backend']} {r['variant']}" for r in ok))
    cols = min(2, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 0.28 * len(labels) * rows + 1.5),
                             squeeze=False, sharey=True, layout="constrained")
    backend_of = {f"{r['optimizer']} {r['backend']} {r['variant']}": r["backend"] for r in ok}
    colors = [BAR_COLORS.get(backend_of[label], BAR_COLORS["fused"]) for label in labels]
    for ax, (suite, dtype) in zip(axes.flat, groups):
        ratio = {f"{r['optimizer']} {r['backend']} {r['variant']}": r["ratio_to_fused_sgd"]
                 for r in ok if (r["suite"], r["dtype"]) == (suite, dtype)}
        values = [ratio.get(label, float("nan")) for label in labels]
        ax.barh(range(len(labels)), values, color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"{suite} ({dtype})", fontsize=10)
        ax.set_xlabel("step time ÷ fused SGD (lower is faster)")
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    axes[0, 0].set_yticks(range(len(labels)), labels)
    axes[0, 0].invert_yaxis()
    fig.suptitle(f"cblr_ext step time, {meta['device_name']}, torch {meta['torch_version']}, "
                 f"{meta['threads']} threads", fontsize=11)
    fig.legend(handles=[Patch(color=c, label=n) for n, c in BAR_COLORS.items()], loc="outside lower center",
               ncols=len(BAR_COLORS), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
