"""A seconds-long run of ``python -m cblr_ext.experiments``: the files it writes and their
structure (no accuracy is asserted), and the options its --help documents."""
import json

import pytest
import torch

from cblr_ext.experiments import cli
from cblr_ext.experiments.presets import preset_config

PLOTS = ["accuracy_vs_batch.png", "variants.png", "accuracy_vs_wall_time.png", "layer_kappa_ratio.png",
         "structure_vs_batch.png"]


def test_tiny_sweep_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "study"
    assert cli.main(["--tasks", "teacher/mlp", "digits/cnn", "--train-size", "1024", "--batch-sizes", "128", "512",
                     "--epochs", "1", "--optimizers", "SGD", "CBLR-k4", "--variants", "plain", "discard", "schedule",
                     "--variant-batch-sizes", "512", "--variant-optimizers", "SGD", "--seeds", "2", "--lr-points", "1",
                     "--jobs", "1", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    document = json.loads((out / "results.json").read_text())
    assert set(document) == {"machine", "config", "columns", "results"}
    assert set(document["machine"]) == {"cpu", "cores", "torch", "backend"}
    results = document["results"]
    # per task: 2 batches × 2 optimizers plain, and SGD's discard and schedule at 512
    assert len(results) == 2 * (4 + 2)
    assert {(r["dataset"], r["optimizer"], r["variant"], r["batch_size"]) for r in results} >= {
        ("teacher", "SGD", "schedule", 512), ("digits", "CBLR-k4", "plain", 128), ("digits", "SGD", "discard", 512)}
    for r in results:
        assert {"model", "epochs", "lr", "lr_grid_val_acc", "seeds", "diverged_seeds", "train_acc", "val_acc",
                "test_acc", "gap", "steps", "wall_s", "curve", "telemetry"} <= set(r)
        assert len(r["test_acc"]["values"]) == 2 and set(r["test_acc"]) == {"mean", "std", "values"}
        assert len(r["lr_grid_val_acc"]) == 1 and str(r["lr"]) in r["lr_grid_val_acc"]
        assert [p["epoch"] for p in r["curve"]] == [1]
        layers = r["telemetry"]["layers"]
        assert {"ndim", "kappa", "ratio", "mean_g_norm", "mean_step_norm"} <= set(next(iter(layers.values())))
    schedule = next(r for r in results if r["variant"] == "schedule" and r["dataset"] == "teacher")
    assert schedule["steps"]["mean"] == 2   # one epoch (< 4) keeps B: 1024 samples at 512
    for name in PLOTS:
        assert (out / name).stat().st_size > 1000, name
        assert str(out / name) in printed
    table = (out / "results.txt").read_text()
    assert table.splitlines()[0].split()[:4] == ["task", "batch", "optimizer", "variant"]
    assert "columns:" in table and "columns:" in printed


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--preset", "--out", "--tasks", "--batch-sizes", "--epochs", "--optimizers", "--variants",
                   "--variant-batch-sizes", "--variant-optimizers", "--seeds", "--train-size", "--lr-points", "--jobs",
                   "--select", "--no-progress"):
        assert option in text


def test_bad_task_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--tasks", "teacher/cnn2"])
    assert "DATASET/MODEL" in capsys.readouterr().err


def test_lr_points_take_the_grid_centre():
    config = preset_config("full")  # the optimizers' own five-point grids (quick sets shorter ones)
    assert config.lr_grid("SGD") == (0.0125, 0.025, 0.05, 0.1, 0.2)
    config.lr_points = 3
    assert config.lr_grid("SGD") == (0.025, 0.05, 0.1)
    config.lr_points = 1
    assert config.lr_grid("LARS") == (32.0,)   # of 8, 16, 32, 64, 128
    config.lr_points = 6
    with pytest.raises(ValueError, match="lr_points"):
        config.lr_grid("MCLR")


def test_screen_presets_hold_their_round_and_the_full_study_none_of_it():
    from cblr_ext.experiments.optimizers import OPTIMIZERS
    rounds = [preset_config(name) for name in ("mnist1d-edge", "mnist1d-edge2", "mnist1d-edge3")]
    round1, round2, round3 = rounds
    assert "LARS-edge" in round1.optimizers and "LARS-edge2" in round2.optimizers
    assert "CBLR-cap3-edge3" in round3.optimizers
    screened = [set(r.optimizers) for r in rounds]
    assert sum(map(len, screened)) == len(set().union(*screened))     # each in one round
    assert all(r.select == "mean" for r in rounds)
    full = preset_config("full").optimizers
    assert not set(full) & set().union(*screened)
    # the paper's study, as README and docs/experiments.md describe it; the defaults' candidates
    # run by name (--optimizers) and from the diagnosis
    assert full == ["SGD", "LARS", "MCLR", "CBLR-k1", "CBLR-k4", "CBLR-k16"]
    assert set(full) | set().union(*screened) <= set(OPTIMIZERS)
    # a ×√2 grid: five points, the centre in the middle
    assert round2.lr_grid("CBLR-cap2-edge2") == pytest.approx((0.8, 0.8 * 2 ** 0.5, 1.6, 1.6 * 2 ** 0.5, 3.2))


def test_screened_entries_name_every_rule_dependent_option():
    """A candidate or screen entry keeps its meaning when the defaults change (issue 21 changed
    them twice): each names exclude_1d, curvature_ema and max_ratio."""
    from cblr_ext import LayerwiseOptimizer
    from cblr_ext.experiments import optimizers as o
    entries = {name: (cls, opts) for name, (cls, opts, _) in o._CANDIDATES.items()}
    entries.update({name: (cls, opts) for name, (_, cls, opts, _, _) in o._EDGE.items()})
    layerwise = {name: opts for name, (cls, opts) in entries.items() if issubclass(cls, LayerwiseOptimizer)}
    assert len(layerwise) == len(entries) - 1          # all but SGD-edge
    missing = {name: set(o.SCREENED_OPTIONS) - set(opts) for name, opts in layerwise.items()}
    assert not any(missing.values()), missing


def test_adam_preset_runs_adamw_lamb_and_the_median_and_secant_rules_end_to_end(tmp_path, capsys):
    import math
    from cblr_ext.experiments.optimizers import OPTIMIZERS
    config = preset_config("adam")
    names = ["AdamW", "LAMB", "LAMB-mclr", "LAMB-cblr"]
    assert config.optimizers == names
    assert config.batch_sizes == {"mnist1d": [256, 4096, 8192], "teacher": [256, 4096, 8192]} and config.seeds == 3
    for name in config.optimizers:   # the same budget: five points a factor 2 apart
        grid = config.lr_grid(name)
        assert len(grid) == 5 and [b / a for a, b in zip(grid, grid[1:])] == pytest.approx([2.0] * 4)
    out = tmp_path / "adam"
    assert cli.main(["--preset", "adam", "--tasks", "teacher/mlp", "--train-size", "512", "--batch-sizes", "128",
                     "256", "--epochs", "1", "--seeds", "2", "--lr-points", "1", "--jobs", "1", "--no-progress",
                     "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert [(r["optimizer"], r["batch_size"]) for r in results] == [
        (name, batch) for batch in (128, 256) for name in names]
    for r in results:
        assert r["lr"] == OPTIMIZERS[r["optimizer"]].lr_grid[2]          # the grid's centre
        assert r["steps"]["mean"] == 512 // r["batch_size"]               # one epoch of 512 samples
        assert not r["diverged_seeds"] and all(math.isfinite(v) for v in r["test_acc"]["values"])
        assert len(r["test_acc"]["values"]) == 2
        # the loss change on the same batch exists only where the step evaluated the closure
        # a second time, at w + s: LAMB-cblr's curvature probe, on every step after the first
        same_batch = r["telemetry"]["mean_loss_drop_same_batch"]
        assert (same_batch is not None and math.isfinite(same_batch)) == (r["optimizer"] == "LAMB-cblr")
    rows = (out / "results.txt").read_text().splitlines()[2:10]
    assert [row.split()[2] for row in rows] == [r["optimizer"] for r in results]


def test_adam_base_lr_follows_the_square_root_of_the_batch_from_4096():
    from cblr_ext.experiments.optimizers import OPTIMIZERS
    from cblr_ext.train import ScaledLR
    for name in ("AdamW", "LAMB", "LAMB-mclr", "LAMB-cblr"):
        spec = OPTIMIZERS[name]
        opt = spec.make(list(torch.nn.Linear(3, 2).named_parameters()), 0.064)
        assert opt.param_groups[0]["weight_decay"] == 0.01
        rule = ScaledLR(opt, spec.base_batch, rule=spec.lr_rule)
        rule.apply(1024, step=0)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.032)      # 0.064 · √(1024/4096)
        rule.apply(16384, step=0)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.128)      # 0.064 · √4
    # the secant rule re-measures κ every step, as the SGD base's CBLR-k1 in the main study
    group = OPTIMIZERS["LAMB-cblr"].make(list(torch.nn.Linear(3, 2).named_parameters()), 1.0).param_groups[0]
    assert (group["rule"], group["curvature_interval"]) == ("cblr", 1)
