"""The diagnosis (python -m cblr_ext.experiments.diagnose): the recorded per-step series
equal what the optimizer reports, and the figures are written."""
import json
import math

import pytest

from cblr_ext.experiments import diagnose
from cblr_ext.experiments.run import RunSpec


def test_recorded_series_are_the_layer_stats():
    run = diagnose.record(RunSpec("digits", "mlp", "LARS-all", 8.0, 512, 2, 0))
    assert run["steps"] == 6   # 1257 training images at 512: 3 steps per epoch
    for layer, entry in run["layers"].items():
        assert all(len(entry[c]) == 6 for c in diagnose.COLUMNS)
        for ratio, alpha, kappa, lars in zip(entry["ratio"], entry["alpha"], entry["kappa"], entry["lars_kappa"]):
            # every layer adapted by LARS: its κ̄ is the LARS κ (ρ = 0), r = η/κ̄
            assert kappa == pytest.approx(lars, rel=1e-5)
            assert ratio == pytest.approx(1e-3 / kappa, rel=1e-5)
        assert not any(entry["fallback"])
    kept = run["quotients"]
    assert sorted(kept) == [1, 2, 4, 5]   # round(6·(k + ½)/4), k = 0..3
    for by_layer in kept.values():
        for q in by_layer.values():
            if len(q["sample"]) < diagnose.QUOTIENT_SAMPLE:   # the whole layer: its lower median
                ordered = sorted(q["sample"])
                assert q["median"] == pytest.approx(ordered[math.ceil(len(ordered) / 2) - 1], rel=1e-6)
            assert q["norm_ratio"] > 0 and math.isfinite(q["norm_ratio"])


def test_command_writes_figures_and_json(tmp_path, capsys):
    assert diagnose.main(["--out", str(tmp_path), "--task", "digits/mlp", "--batch-size", "512", "--epochs", "1",
                          "--runs", "LARS-x1d=4", "MCLR-all=4", "CBLR-all=0.2"]) == 0
    for name in ("diagnosis_step_sizes.png", "diagnosis_quotients.png", "diagnosis_kappa_mclr-all.png",
                 "diagnosis_kappa_cblr-all.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    document = json.loads((tmp_path / "diagnosis.json").read_text())
    assert set(document) == {"LARS-x1d", "MCLR-all", "CBLR-all"}
    assert "LARS-x1d lr 4: val" in capsys.readouterr().out


def test_seed_option_records_that_seed(tmp_path):
    assert diagnose.main(["--out", str(tmp_path), "--task", "digits/mlp", "--batch-size", "512", "--epochs", "1",
                          "--runs", "LARS-all=4", "--seed", "1"]) == 0
    document = json.loads((tmp_path / "diagnosis.json").read_text())["LARS-all"]
    assert document["spec"]["seed"] == 1
    ratios = {seed: diagnose.record(RunSpec("digits", "mlp", "LARS-all", 4.0, 512, 1, seed))["layers"]["1.weight"]["ratio"]
              for seed in (0, 1)}
    assert document["layers"]["1.weight"]["ratio"] == pytest.approx(ratios[1], rel=1e-12)
    assert ratios[0] != ratios[1]
