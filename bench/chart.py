"""One PNG per (suite, dtype): step time (ms) and step time ÷ fused SGD side by
side, each bar with its 95 % interval as an error bar."""
from __future__ import annotations

from pathlib import Path

# Bar colours by backend; every other (fused) cblr_ext backend is "fused".
BAR_COLORS = {"torch": "tab:gray", "pytorch-optimizer": "darkgray", "reference": "lightsteelblue",
              "torch.compile(reference)": "tab:orange", "fused": "tab:blue"}
WIDE_HATCH = "///"


def _color_name(backend: str) -> str:
    return backend if backend in BAR_COLORS else "fused"


def _errors(rows, median, low, high):
    """matplotlib's (below, above) error lengths; 0 where a bound is missing."""
    below = [r[median] - r[low] if r[low] is not None else 0 for r in rows]
    above = [r[high] - r[median] if r[high] is not None else 0 for r in rows]
    return [below, above]


def chart(path: Path, meta: dict, rows: list, target: float) -> None:
    """The chart of the timed records ``rows`` of one (suite, dtype)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [r for r in rows if r["median_ms"] is not None]
    labels = [f"{r['optimizer']} {r['backend']} {r['variant']}" for r in rows]
    colors = [BAR_COLORS[_color_name(r["backend"])] for r in rows]
    fig, (ms_ax, ratio_ax) = plt.subplots(1, 2, figsize=(12, 0.32 * len(rows) + 1.8), sharey=True,
                                          layout="constrained")
    y = range(len(rows))
    panels = ((ms_ax, "median_ms", "ci_low_ms", "ci_high_ms", "step time, ms (log scale)", "{:.4g}"),
              (ratio_ax, "ratio_to_fused_sgd", "ratio_ci_low", "ratio_ci_high",
               "step time ÷ fused SGD timed in turn (log scale; lower is faster)", "{:.3g}×"))
    for ax, median, low, high, xlabel, text in panels:
        values = [r[median] for r in rows]
        hatches = [WIDE_HATCH if r[low] is None or max(r[median] - r[low], r[high] - r[median]) > target * r[median]
                   else "" for r in rows]
        bars = ax.barh(y, values, color=colors, xerr=_errors(rows, median, low, high), capsize=2,
                       error_kw={"elinewidth": 0.8, "ecolor": "black"})
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
        for i, (value, r) in enumerate(zip(values, rows)):
            ax.annotate(text.format(value), (r[high] or value, i), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel, fontsize=9)
        ax.margins(x=0.15)
        ax.grid(axis="x", which="both", linewidth=0.3, alpha=0.5)
    ratio_ax.axvline(1.0, color="black", linewidth=0.8)
    ms_ax.set_yticks(list(y), labels, fontsize=8)
    ms_ax.invert_yaxis()
    first = rows[0] if rows else {"suite": "?", "dtype": "?"}
    fig.suptitle(f"{first['suite']} ({first['dtype']}): optimizer step, {meta['device_name']}, "
                 f"torch {meta['torch_version']}, {meta['threads']} thread{'' if meta['threads'] == 1 else 's'}", fontsize=10)
    present = {}  # colour name -> the backends of the chart drawn in it
    for r in rows:
        present.setdefault(_color_name(r["backend"]), {}).setdefault(r["backend"])
    handles = [Patch(color=BAR_COLORS[name], label=f"cblr_ext fused: {', '.join(backends)}" if name == "fused"
                     else name) for name, backends in present.items()]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch=WIDE_HATCH,
                         label=f"interval wider than ±{100 * target:.0f} %"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8,
               title="bars: median; error bars: 95 % interval", title_fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
