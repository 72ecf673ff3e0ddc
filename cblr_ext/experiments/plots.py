"""The study's figures (matplotlib, written as PNG files)."""
from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")   # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .report import machine  # noqa: E402


def _tasks(results):
    return list(dict.fromkeys((r["dataset"], r["model"]) for r in results))


def _of(results, task, variant="plain"):
    return [r for r in results if (r["dataset"], r["model"]) == task and r["variant"] == variant]


def _by_optimizer(rows):
    out = {}
    for r in rows:
        out.setdefault(r["optimizer"], []).append(r)
    return {k: sorted(v, key=lambda r: r["batch_size"]) for k, v in out.items()}


def accuracy_vs_batch(results, path):
    tasks = _tasks(results)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, rows in _by_optimizer(_of(results, task)).items():
            ax.errorbar([r["batch_size"] for r in rows], [100 * r["test_acc"]["mean"] for r in rows],
                        yerr=[100 * r["test_acc"]["std"] for r in rows], marker="o", capsize=3, label=name)
        ax.set(xscale="log", xlabel="batch size", ylabel="test accuracy % (mean ± std over seeds)",
               title=f"{task[0]} / {task[1]}")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def overview(results, path):
    """The first task at its smallest and largest batch: test accuracy per optimizer side by
    side with the change written over it, and each run's validation accuracy per epoch."""
    task = _tasks(results)[0]
    rows = _of(results, task)
    small, large = min(r["batch_size"] for r in rows), max(r["batch_size"] for r in rows)
    if small == large:
        return False
    at = {(r["optimizer"], r["batch_size"]): r for r in rows}
    names = [name for name in dict.fromkeys(r["optimizer"] for r in rows) if (name, small) in at and (name, large) in at]
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.38
    for k, name in enumerate(names):
        low, high = (100 * at[name, b]["test_acc"]["mean"] for b in (small, large))
        colour = f"C{k}"
        bars.bar(k - width / 2, low, width, color=colour, alpha=0.45)
        bars.bar(k + width / 2, high, width, color=colour)
        bars.annotate(f"{high - low:+.1f}", (k + width / 2, high), ha="center", va="bottom", fontsize=10,
                      fontweight="bold")
        for batch, style in ((small, "--"), (large, "-")):
            curve = at[name, batch]["curve"]
            curves.plot([p["epoch"] for p in curve], [100 * p["val_acc"] for p in curve], style, color=colour,
                        label=f"{name}, B={batch}")
    every = [100 * at[name, b]["test_acc"]["mean"] for name in names for b in (small, large)]
    bars.set_ylim(max(0.0, min(every) - 10), min(100.0, max(every) + 4))
    bars.set_xticks(range(len(names)))
    bars.set_xticklabels(names)
    bars.set(ylabel="test accuracy %", title=f"{task[0]} / {task[1]}: batch {small} (light) → {large} (dark), "
                                              "change in points")
    bars.grid(axis="y", alpha=0.3)
    curves.set(xlabel="epoch", ylabel="validation accuracy %", title="validation accuracy during training (seed 0)")
    curves.set_ylim(max(0.0, min(every) - 25), None)
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7, ncol=2)
    _save(fig, path)
    return True


def variants_vs_batch(results, path):
    """Test accuracy of plain, discard and schedule where the variants ran."""
    tasks = [t for t in _tasks(results) if any(r["variant"] != "plain" for r in results
                                               if (r["dataset"], r["model"]) == t)]
    if not tasks:
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in results if (r["dataset"], r["model"]) == task]
        variant_rows = [r for r in rows if r["variant"] != "plain"]
        keys = sorted({(r["batch_size"], r["optimizer"]) for r in variant_rows})
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            found = {(r["batch_size"], r["optimizer"]): r for r in rows if r["variant"] == variant}
            xs = [k for k, key in enumerate(keys) if key in found]
            ax.bar([x + i * width for x in xs], [100 * found[keys[x]]["test_acc"]["mean"] for x in xs], width,
                   yerr=[100 * found[keys[x]]["test_acc"]["std"] for x in xs], capsize=2, label=variant)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))])
        ax.set_xticklabels([f"{o}\nB={b}" for b, o in keys], fontsize=7)
        low = min(100 * r["test_acc"]["mean"] for r in rows if (r["batch_size"], r["optimizer"]) in keys)
        ax.set_ylim(max(0.0, low - 5), None)
        ax.set(ylabel="test accuracy %", title=f"{task[0]} / {task[1]}: training methods")
        ax.legend(fontsize=8)
    _save(fig, path)
    return True


def accuracy_vs_wall(results, path):
    """Test accuracy over training time at each task's largest batch (seed 0)."""
    tasks = _tasks(results)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = _of(results, task)
        batch = max(r["batch_size"] for r in rows)
        for r in rows:
            if r["batch_size"] == batch:
                ax.plot([p["wall_s"] for p in r["curve"]], [100 * p["test_acc"] for p in r["curve"]],
                        marker=".", label=r["optimizer"])
        ax.set(xlabel="training time s (seed 0)", ylabel="test accuracy %", title=f"{task[0]} / {task[1]}, B={batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def _weight_layers(layers):
    # the weights: biases and BatchNorm scales are not adapted under exclude_1d (r = 1, no κ)
    return [name for name, entry in layers.items() if entry["ndim"] > 1]


def layer_curvature(results, path):
    """Per-layer κ and r over training for each layer-wise optimizer at the first task's
    largest batch (seed 0)."""
    task = _tasks(results)[0]
    rows = _of(results, task)
    batch = max(r["batch_size"] for r in rows)
    rows = [r for r in rows if r["batch_size"] == batch and r["optimizer"] != "SGD"]
    if not rows:
        return False
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 2.6 * len(rows)), squeeze=False)
    for (ax_k, ax_r), r in zip(axes, rows):
        layers = r["telemetry"]["layers"]
        for name in _weight_layers(layers):
            for ax, column in ((ax_k, "kappa"), (ax_r, "ratio")):
                series = layers[name][column]
                ax.plot(series["steps"], series["values"], marker=".", label=name)
        ax_k.set(yscale="log", ylabel=f"{r['optimizer']}\nκ̄")
        ax_r.set(yscale="log", ylabel="r")
        ax_k.legend(fontsize=7)
    axes[0][0].set_title(f"{task[0]} / {task[1]}, B={batch}: curvature κ̄ per layer")
    axes[0][1].set_title("ratio r = η/κ̄ per layer")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    _save(fig, path)
    return True


def structure_vs_batch(results, path):
    """Gao & Zhong's structural quantities against the batch size, per optimizer: ‖g‖ and
    ‖s‖ averaged over the run and the weight layers, and the loss decrease per step."""
    tasks = _tasks(results)
    panels = [("‖g‖ (mean over steps, weight layers)", lambda t: _mean_layers(t, "mean_g_norm")),
              ("‖s‖ step length", lambda t: _mean_layers(t, "mean_step_norm")),
              ("loss decrease per step (next batch)", lambda t: t["mean_loss_drop_next_batch"])]
    fig, axes = plt.subplots(len(tasks), 3, figsize=(15, 3.6 * len(tasks)), squeeze=False)
    for row_axes, task in zip(axes, tasks):
        for ax, (label, value) in zip(row_axes, panels):
            for name, rows in _by_optimizer(_of(results, task)).items():
                ax.plot([r["batch_size"] for r in rows], [value(r["telemetry"]) for r in rows], marker="o",
                        label=name)
            ax.set_xscale("log", base=2)
            ax.set(xlabel="batch size", title=f"{task[0]}/{task[1]}: {label}")
            ax.grid(alpha=0.3)
        row_axes[0].set_yscale("log")
        row_axes[1].set_yscale("log")
        row_axes[0].legend(fontsize=7)
    _save(fig, path)


def _mean_layers(telemetry, key):
    layers = telemetry["layers"]
    values = [layers[name][key] for name in _weight_layers(layers) if math.isfinite(layers[name][key])]
    return sum(values) / len(values) if values else math.nan


def machine_label() -> str:
    """The machine every figure names (its numbers are this machine's)."""
    m = machine()
    return f"{m['cores']}-core {m['cpu']}, torch {m['torch']}"


def _save(fig, path):
    fig.text(0.995, 0.005, machine_label(), ha="right", va="bottom", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_all(results, folder) -> list:
    """Write every figure that the results support; returns their paths."""
    written = []
    for name, draw in (("overview.png", overview), ("accuracy_vs_batch.png", accuracy_vs_batch), ("variants.png", variants_vs_batch),
                       ("accuracy_vs_wall_time.png", accuracy_vs_wall), ("layer_kappa_ratio.png", layer_curvature),
                       ("structure_vs_batch.png", structure_vs_batch)):
        path = os.path.join(folder, name)
        if draw(results, path) is not False:
            written.append(path)
    return written
