"""What the transfer protocol writes: its JSON, a Markdown report (selection, choice, held-out
tables) and the γ-window figure."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict

from .plots import _save, plt
from .report import _json_safe, machine

NARROW_OCTAVES = 1.0   # a window narrower than this is flagged: one γ off by ×2 leaves it


def _window_text(w) -> str:
    edges = ("≥" if w["low_censored"] or w["high_censored"] else "")
    return f"{edges}{w['octaves']:.2f} ({w['low_gamma']:.3g} – {w['high_gamma']:.3g})"


def markdown(config, result, wall_s: float) -> str:
    selection, held = result["selection"], result["held_out"]
    m = machine()
    lines = [f"# Defaults that transfer: {len(selection['cells'])} selection cells, "
             f"{len(held['rows'])} held-out rows",
             "", f"{m['cores']}-core {m['cpu']}, torch {m['torch']}; {wall_s / 60:.1f} min wall; "
             f"{config.epochs} epochs; selection seeds {list(config.selection_seeds)}, "
             f"held-out seeds {list(config.held_out_seeds)}; γ grid centre·2^(k/2), k = {config.grid[0]} … "
             f"{config.grid[1]}; window and choice tolerance {config.tolerance:g} point.",
             "", "## Selection (" + ", ".join(t.name for t in config.selection) + ": validation accuracy, "
             "mean over the selection seeds)", "",
             "| rule | candidate | batch | best γ | val % | window, octaves (γ range) | diverged runs |",
             "|---|---|---:|---:|---:|---|---:|"]
    for c in selection["cells"]:
        narrow = " **narrow**" if c["window"]["octaves"] < NARROW_OCTAVES else ""
        lines.append(f"| {c['rule']} | {c['candidate']} | {c['batch_size']} | {c['gamma']:.4g} | {c['val_acc']:.1f} | "
                     f"{_window_text(c['window'])}{narrow} | {sum(g['diverged_seeds'] for g in c['grid'])} |")
    lines += ["", "≥: the window reaches an end of the grid, so it may be wider.", "",
              "## Choice (candidates within the tolerance of the best mean validation accuracy; of those, "
              "the widest narrowest window)", "",
              "| rule | chosen | γ per batch | candidates: mean best val %, narrowest window |", "|---|---|---|---|"]
    for rule, pick in selection["choice"].items():
        gammas = ", ".join(f"{b}: {g:.4g}" for b, g in sorted(pick["gamma"].items()))
        others = "; ".join(f"{n} {s['mean_best_val']:.1f}, {s['min_window']:.2f} oct"
                           for n, s in pick["candidates"].items())
        lines.append(f"| {rule} | {pick['candidate']} | {gammas} | {others} |")
    lines += ["", "## Held out (test accuracy, mean ± std over the held-out seeds; nothing chosen here)", "",
              "| task | batch | rule | candidate | γ | test % | diverged |", "|---|---:|---|---|---:|---:|---:|"]
    for r in held["rows"]:
        t = r["test_acc"]
        lines.append(f"| {r['task']} | {r['batch_size']} | {r['rule']} | {r['candidate']} | {r['gamma']:.4g} | "
                     f"{t['mean']:.1f} ± {t['std']:.1f} | {r['diverged_seeds']} |")
    lead_key = next(k for k in held if k.startswith("lead_over_"))
    lines += ["", f"## Lead over {lead_key[len('lead_over_'):]} on the held-out suite (points, mean over tasks)", "",
              "| batch | rule | mean lead | ahead on |", "|---:|---|---:|---|"]
    for s in held[lead_key]:
        lines.append(f"| {s['batch_size']} | {s['rule']} | {s['mean_lead']:+.1f} | {s['ahead_on']} of {s['tasks']} |")
    return "\n".join(lines) + "\n"


def window_plot(result, path) -> None:
    """Per batch: validation accuracy against γ relative to each candidate's best γ (so the
    rules' γ scales line up), the chosen candidate solid, the window shaded."""
    cells = result["selection"]["cells"]
    chosen = {rule: pick["candidate"] for rule, pick in result["selection"]["choice"].items()}
    batches = sorted({c["batch_size"] for c in cells})
    rules = list(dict.fromkeys(c["rule"] for c in cells))
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.4), squeeze=False, sharey=True)
    for ax, batch in zip(axes[0], batches):
        for c in (c for c in cells if c["batch_size"] == batch):
            colour = f"C{rules.index(c['rule'])}"
            x = [math.log2(g["gamma"] / c["gamma"]) for g in c["grid"]]
            mine = c["candidate"] == chosen[c["rule"]]
            ax.plot(x, [g["val_acc"] for g in c["grid"]], color=colour, marker="o", ms=3,
                    ls="-" if mine else ":", label=f"{c['candidate']} ({c['window']['octaves']:.2f} oct)")
            if mine:
                w = c["window"]
                ax.axvspan(math.log2(w["low_gamma"] / c["gamma"]), math.log2(w["high_gamma"] / c["gamma"]),
                           color=colour, alpha=0.08)
        ax.set(xlabel="log2(γ / best γ)", title=f"batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("validation accuracy % (selection)")
    _save(fig, path)


def write_all(folder, config, result, wall_s: float) -> list:
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, name) for name in ("transfer.json", "transfer.md", "gamma_windows.png")]
    with open(paths[0], "w") as f:
        json.dump(_json_safe({"machine": machine(), "config": asdict(config), "wall_s": wall_s, **result}), f,
                  indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown(config, result, wall_s))
    window_plot(result, paths[2])
    return paths
