"""The transfer protocol: the γ-window width, the robust choice, held-out runs at exactly the
chosen settings, and what ``--transfer`` writes."""
import json
import math
import os

import pytest

from cblr_ext.experiments.cli import main
from cblr_ext.experiments.run import RunSpec, train_run
from cblr_ext.experiments.transfer import PROTOCOL, SHORT, TINY, Task, TransferConfig, select, selection_specs
from cblr_ext.experiments.windows import window

R2 = math.sqrt(2.0)


# --- the window ---------------------------------------------------------------------------

def test_window_interpolates_both_crossings():
    # log2 γ = 0, .5, 1, 1.5, 2; best 80 at γ = 2, threshold 79.  Below: 79.5 at .5 and 70 at 0
    # cross 79 at .5 − .5·(0.5/9.5); above: 79 at 1.5 is on the threshold, 60 at 2 is out.
    w = window([1, R2, 2, 2 * R2, 4], [70, 79.5, 80, 79, 60], 1.0)
    assert w.best_gamma == 2 and w.best_acc == 80
    assert math.log2(w.low_gamma) == pytest.approx(0.5 - 0.5 * 0.5 / 9.5)
    assert math.log2(w.high_gamma) == pytest.approx(1.5)
    assert w.octaves == pytest.approx(1 + 1 / 38)
    assert not w.censored


def test_window_of_a_spike_and_of_a_plateau():
    spike = window([1, R2, 2, 2 * R2, 4], [0, 0, 80, 0, 0], 1.0)
    assert spike.octaves == pytest.approx(2 * 0.5 / 80)   # 1/80 of the half-octave each side
    flat = window([1, R2, 2, 2 * R2, 4], [80] * 5, 1.0)
    assert flat.octaves == pytest.approx(2.0) and flat.low_censored and flat.high_censored


def test_window_ties_go_to_the_smaller_gamma():
    w = window([1, R2, 2], [80, 80, 50], 1.0)
    assert w.best_gamma == 1 and w.low_censored and not w.high_censored
    assert w.octaves == pytest.approx(0.5 + 0.5 / 30)


@pytest.mark.parametrize("gammas, accs", [([1, 2], [80]), ([2, 1], [1, 2]), ([0, 1], [1, 2]),
                                          ([1, 2], [1, math.nan]), ([], [])])
def test_window_refuses_bad_input(gammas, accs):
    with pytest.raises(ValueError):
        window(gammas, accs)


# --- the choice on a synthetic table --------------------------------------------------------

SYNTH = TransferConfig(
    selection=(Task("teacher", "mlp", (256, 1024)),), held_out=(Task("digits", "mlp", (256,)),),
    candidates={"SGD": ("SGD",), "MCLR": ("MCLR", "MCLR-cap0.25", "MCLR-x1d")},
    centres={"SGD": {256: 0.1, 1024: 0.1}, "MCLR": {256: 8.0, 1024: 8.0}}, selection_seeds=(0, 1))
# validation accuracy per grid point (k = -2 … 2), the same at both batches except where noted:
CURVES = {"MCLR": [0.60, 0.70, 0.80, 0.70, 0.60],           # best 80, window 0.1 octave
          "MCLR-cap0.25": [0.79, 0.79, 0.795, 0.79, 0.79],  # best 79.5 (within 1 point), window 2 octaves
          "MCLR-x1d": [0.78] * 5,                           # widest window, but 2 points below the best
          "SGD": [0.5, 0.6, 0.7, 0.9, 0.5]}                 # 0.9 at k = 1 diverged on seed 1


def _synthetic_runs():
    runs = {}
    for (rule, name, batch), grid in selection_specs(SYNTH).items():
        curve = list(CURVES[name])
        if name == "MCLR-cap0.25" and batch == 1024:
            curve = [0.79, 0.79, 0.79, 0.795, 0.79]             # its best moves to k = 1 at 1024
        for k, (gamma, specs) in enumerate(grid.items()):
            for spec in specs:
                spread = 0.01 if spec.seed == 0 else -0.01          # the mean over seeds is the curve
                runs[spec] = {"val_acc": curve[k] + spread, "test_acc": curve[k],
                              "diverged": name == "SGD" and k == 3 and spec.seed == 1}
    return runs


def test_selection_picks_the_widest_window_within_the_tolerance():
    choice = select(SYNTH, _synthetic_runs())["choice"]
    mclr = choice["MCLR"]
    assert mclr["candidate"] == "MCLR-cap0.25"
    assert mclr["candidates"]["MCLR"]["mean_best_val"] == pytest.approx(80.0)
    assert mclr["candidates"]["MCLR"]["min_window"] == pytest.approx(0.1)
    assert mclr["candidates"]["MCLR-cap0.25"]["mean_best_val"] == pytest.approx(79.5)
    assert mclr["candidates"]["MCLR-cap0.25"]["min_window"] == pytest.approx(2.0)
    assert mclr["gamma"] == {256: pytest.approx(8.0), 1024: pytest.approx(8.0 * R2)}
    # a diverged seed scores −1: SGD's best γ is the next best finite mean, k = 0
    assert choice["SGD"]["gamma"] == {256: pytest.approx(0.1), 1024: pytest.approx(0.1)}


def test_selection_without_a_near_rival_keeps_the_best():
    runs = _synthetic_runs()
    for spec in runs:
        if spec.optimizer == "MCLR-cap0.25":
            runs[spec] = {**runs[spec], "val_acc": runs[spec]["val_acc"] - 0.02}   # now 77.5: out of reach
    assert select(SYNTH, runs)["choice"]["MCLR"]["candidate"] == "MCLR"


def test_config_refuses_a_task_or_seed_in_both_suites():
    with pytest.raises(ValueError, match="data set is in both"):
        TransferConfig(selection=(Task("teacher", "mlp", (256,)),), held_out=(Task("teacher", "mlp", (256,)),),
                       candidates={"SGD": ("SGD",)}, centres={"SGD": {256: 0.1}})
    with pytest.raises(ValueError, match="seed is in both"):
        TransferConfig(selection=(Task("teacher", "mlp", (256,)),), held_out=(Task("digits", "mlp", (256,)),),
                       candidates={"SGD": ("SGD",)}, centres={"SGD": {256: 0.1}}, held_out_seeds=(0,))


def test_short_preset_cuts_only_batches_epochs_and_selection_seeds():
    assert {b for t in SHORT.selection + SHORT.held_out for b in t.batch_sizes} == {1024, 8192}
    assert [t.name for t in SHORT.held_out] == [t.name for t in PROTOCOL.held_out]
    assert (SHORT.candidates, SHORT.grid, SHORT.held_out_seeds) == (PROTOCOL.candidates, PROTOCOL.grid,
                                                                    PROTOCOL.held_out_seeds)
    assert SHORT.epochs == 10 and SHORT.selection_seeds == (0, 1)


# --- the CLI end to end (tiny preset) -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    assert main(["--transfer", "tiny", "--out", str(out), "--jobs", "1", "--no-progress"]) == 0
    with open(out / "transfer.json") as f:
        return out, json.load(f)


def test_cli_writes_json_markdown_and_plot(tiny_out):
    out, doc = tiny_out
    assert sorted(os.listdir(out)) == ["gamma_windows.png", "transfer.json", "transfer.md"]
    assert (out / "gamma_windows.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "transfer.md").read_text()
    for row in doc["held_out"]["rows"]:
        assert (f"| {row['task']} | {row['batch_size']} | {row['rule']} | {row['candidate']} | {row['gamma']:.4g} | "
                f"{row['test_acc']['mean']:.1f} ± {row['test_acc']['std']:.1f} |") in text
    assert doc["config"]["epochs"] == TINY.epochs


def test_selection_gamma_is_the_best_mean_of_its_grid(tiny_out):
    _, doc = tiny_out
    for cell in doc["selection"]["cells"]:
        assert not any(g["diverged_seeds"] for g in cell["grid"])   # else a diverged seed scores −1
        best = max(cell["grid"], key=lambda g: (g["val_acc"], -g["gamma"]))
        assert cell["gamma"] == best["gamma"]
        assert cell["gamma"] in [pytest.approx(g) for g in TINY.gammas(cell["rule"], cell["batch_size"])]


def test_held_out_runs_use_exactly_the_selected_settings(tiny_out):
    _, doc = tiny_out
    choice = doc["selection"]["choice"]
    rows = doc["held_out"]["rows"]
    assert {(r["task"], r["batch_size"], r["rule"]) for r in rows} == {
        (t.name, b, rule) for t in TINY.held_out for b in t.batch_sizes for rule in TINY.candidates}
    for r in rows:
        assert r["candidate"] == choice[r["rule"]]["candidate"]
        assert r["gamma"] == choice[r["rule"]]["gamma"][str(r["batch_size"])]
        dataset, model = r["task"].split("/")
        again = [100 * train_run(RunSpec(dataset, model, r["candidate"], r["gamma"], r["batch_size"], TINY.epochs,
                                         seed, train_size=TINY.train_size))["test_acc"]
                 for seed in TINY.held_out_seeds]
        assert r["test_acc"]["values"] == pytest.approx(again)
    by = {(r["task"], r["batch_size"], r["rule"]): r["test_acc"]["mean"] for r in rows}
    for lead in doc["held_out"]["lead_over_SGD"]:
        assert lead["mean_lead"] == pytest.approx(by["digits/mlp", lead["batch_size"], lead["rule"]]
                                                  - by["digits/mlp", lead["batch_size"], "SGD"])


def test_cli_transfer_refuses_sweep_options(tmp_path):
    with pytest.raises(SystemExit, match="--epochs"):
        main(["--transfer", "tiny", "--out", str(tmp_path), "--epochs", "3"])
    assert not os.listdir(tmp_path)
