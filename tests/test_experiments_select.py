"""How the sweep picks the lr (``SweepConfig.select``), with the training replaced by a
table of validation accuracies: seed 0 alone can pick a γ at the edge of stability that
another seed does not survive; the mean over the seeds does not."""
import pytest

from cblr_ext.experiments import sweep
from cblr_ext.experiments.sweep import SweepConfig, choose_lr, run_sweep

# (lr, seed) -> validation accuracy; None: the run diverged.  The ×2 grid of LARS is 8 … 128.
VAL = {(8.0, 0): 0.70, (8.0, 1): 0.71, (8.0, 2): 0.69,
       (16.0, 0): 0.80, (16.0, 1): 0.82, (16.0, 2): 0.81,
       (32.0, 0): 0.90, (32.0, 1): None, (32.0, 2): 0.90,   # the edge: seed 1 diverges
       (64.0, 0): None, (64.0, 1): None, (64.0, 2): None,
       (128.0, 0): None, (128.0, 1): None, (128.0, 2): None}


@pytest.fixture
def runs(monkeypatch):
    done = []

    def fake_run(spec):
        done.append((spec.lr, spec.seed))
        val = VAL[(spec.lr, spec.seed)]
        acc = 0.1 if val is None else val
        return {"diverged": val is None, "val_acc": acc, "train_acc": acc, "test_acc": acc - 0.01,
                "steps": 10, "wall_s": 1.0, "curve": [], "telemetry": {}}
    monkeypatch.setattr(sweep, "train_run", fake_run)
    return done


def config(select):
    return SweepConfig(tasks=[("teacher", "mlp")], batch_sizes={"teacher": [4096]}, epochs={"teacher": 1},
                       optimizers=["LARS"], seeds=3, select=select)


def test_seed0_picks_the_edge_and_reruns_it(runs):
    (result,) = run_sweep(config("seed0"), progress=False)
    assert result["lr"] == 32.0 and result["diverged_seeds"] == 1
    assert sorted(runs) == sorted([(lr, 0) for lr in (8.0, 16.0, 32.0, 64.0, 128.0)] + [(32.0, 1), (32.0, 2)])
    assert result["test_acc"]["values"] == pytest.approx([0.89, 0.09, 0.89])


def test_mean_runs_every_seed_and_picks_the_best_mean(runs):
    (result,) = run_sweep(config("mean"), progress=False)
    # 32: (0.90 − 1 + 0.90) / 3 = 0.27 against 16: 0.81
    assert result["lr"] == 16.0 and result["diverged_seeds"] == 0 and result["select"] == "mean"
    assert sorted(runs) == sorted(VAL)  # every (lr, seed) once, nothing rerun
    assert result["lr_grid_val_acc"]["16.0"] == pytest.approx(0.81)
    assert result["lr_grid_val_acc"]["32.0"] == pytest.approx((0.90 + 0.1 + 0.90) / 3)
    assert result["test_acc"]["values"] == pytest.approx([0.79, 0.81, 0.80])


def test_ties_go_to_the_smaller_lr_and_bad_selections_are_refused(runs):
    assert choose_lr({4.0: 0.5, 2.0: 0.5, 1.0: 0.4}) == 2.0
    with pytest.raises(ValueError, match="select"):
        run_sweep(config("median"), progress=False)
