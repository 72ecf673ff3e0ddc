"""The figures of the diagnosis (diagnose.py): per-layer step sizes, the quotients against
the norm ratio, and CBLR's κ against the LARS κ."""
from __future__ import annotations

import math
import os

from .plots import _save, plt


def _smooth(values, width=5):
    """A running median over ``width`` steps (the per-step series are noisy)."""
    out = []
    for i in range(len(values)):
        window = sorted(v for v in values[max(0, i - width + 1):i + 1] if not math.isnan(v))
        out.append(window[len(window) // 2] if window else math.nan)
    return out


def step_sizes(recorded, path):
    """Rows: α and ‖s‖/‖w‖ per layer; one column per run; biases dashed."""
    fig, axes = plt.subplots(2, len(recorded), figsize=(4 * len(recorded), 6.5), squeeze=False, sharey="row")
    for col, (name, run) in enumerate(recorded.items()):
        for layer, entry in run["layers"].items():
            style = "--" if layer.endswith("bias") else "-"
            for row, column in enumerate(("alpha", "step_over_w")):
                axes[row][col].plot(_smooth(entry[column]), style, label=layer, lw=1.2)
        spec = run["spec"]
        axes[0][col].set_title(f"{name} γ={spec['lr']:g} (test {100 * run['test_acc']:.1f}%)", fontsize=9)
        axes[0][col].set(yscale="log", ylabel="α = γ·r" if col == 0 else None)
        axes[1][col].set(yscale="log", xlabel="step", ylabel="‖s‖/‖w‖ per step" if col == 0 else None)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{spec['dataset']}/{spec['model']}, batch {spec['batch_size']}: per-layer step (dashed: biases)",
                 fontsize=10)
    _save(fig, path)


def quotients(recorded, path, run_name):
    """Histograms of h_i = |d_i|/|w_i| per layer at each kept step: median and ‖d‖/‖w‖ marked."""
    run = recorded[run_name]
    steps = sorted(run["quotients"])
    layers = list(run["layers"])
    fig, axes = plt.subplots(len(steps), len(layers), figsize=(2.6 * len(layers), 2.0 * len(steps)), squeeze=False)
    for i, step in enumerate(steps):
        for j, layer in enumerate(layers):
            q = run["quotients"][step][layer]
            ax = axes[i][j]
            sample = [v for v in q["sample"] if v > 0]
            if sample:
                lo, hi = math.log10(min(sample)), math.log10(max(sample))
                bins = [10 ** (lo + (hi - lo) * k / 40) for k in range(41)] if hi > lo else 10
                ax.hist(sample, bins=bins, color="0.6")
            ax.axvline(q["median"], color="C0", label="median h (MCLR κ)")
            ax.axvline(q["norm_ratio"], color="C3", label="‖d‖/‖w‖ (LARS κ)")
            ax.set_xscale("log")
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(layer, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"step {step}", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{run_name}: element-wise quotients |d_i|/|w_i|", fontsize=10)
    _save(fig, path)


def kappa_against_lars(recorded, path, run_name):
    """Per layer: the rule's κ̄ over the LARS κ of the same step, and the fallback rate."""
    run = recorded[run_name]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for layer, entry in run["layers"].items():
        quotient = [k / l if l and not math.isnan(k) else math.nan for k, l in zip(entry["kappa"], entry["lars_kappa"])]
        rate = sum(entry["fallback"]) / len(entry["fallback"])
        ax.plot(_smooth(quotient), "--" if layer.endswith("bias") else "-", label=f"{layer} (fallback {rate:.0%})")
    ax.set(yscale="log", xlabel="step", ylabel="κ̄ / κ_LARS", title=f"{run_name}: measured κ over the LARS κ")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def write_all(recorded, folder) -> list:
    written = [os.path.join(folder, "diagnosis_step_sizes.png")]
    step_sizes(recorded, written[0])
    for name in recorded:
        if name.startswith("MCLR"):
            written.append(os.path.join(folder, "diagnosis_quotients.png"))
            quotients(recorded, written[-1], name)
        if name.startswith(("MCLR", "CBLR")):
            written.append(os.path.join(folder, f"diagnosis_kappa_{name.lower()}.png"))
            kappa_against_lars(recorded, written[-1], name)
    return written
