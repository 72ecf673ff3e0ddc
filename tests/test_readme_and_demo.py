"""The README's usage examples run, and the main job (python -m cblr_ext) compares every rule
at a small and a large batch on MNIST-1D (the teacher task on request)."""
import functools
import json
import math
import pathlib
import re

import pytest

from cblr_ext import demo
from cblr_ext.experiments import data, presets, run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_usage_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    stats = namespace["opt"].layer_stats()
    assert stats and all(s["ratio"] > 0 for s in stats.values())


RULES = ("SGD", "LARS", "MCLR", "CBLR-k1")


@pytest.fixture
def small_mnist1d(tmp_path, monkeypatch):
    """The main job's data set at 2,500 generated sequences instead of 40,000 (2,000 train,
    of which 250 validation; 500 test), cached in the test's folder."""
    monkeypatch.setitem(data.DATASETS, "mnist1d", functools.partial(
        data.mnist1d, num_samples=2500, val_size=250, cache_dir=str(tmp_path / "cache")))
    run._cached_data.cache_clear()
    yield
    run._cached_data.cache_clear()


def _table_rows(printed, task):
    return [line.split() for line in printed.splitlines() if line.startswith(task + " ")]


def test_main_job_compares_every_rule_on_mnist1d(tmp_path, capsys, small_mnist1d):
    out = tmp_path / "demo"
    assert demo.main(["--epochs", "2", "--batch-sizes", "64", "512", "--jobs", "1", "--no-progress",
                      "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MNIST-1D" in printed.split("\n")[0]
    rows = _table_rows(printed, "mnist1d/mlp")
    assert sorted((cols[2], cols[1]) for cols in rows) == sorted((name, b) for name in RULES for b in ("64", "512"))
    # steps: ceil(1750 / batch) per epoch, 2 epochs
    assert {cols[1]: cols[5] for cols in rows} == {"64": str(2 * math.ceil(1750 / 64)), "512": str(2 * 4)}
    for column in ("lr ", "steps", "train", "test", "gap", "wall s"):
        assert f"\n  {column}" in printed
    results = json.loads((out / "results.json").read_text())["results"]
    for r in results:
        assert r["diverged_seeds"] == 0
        # the lr is the one of the best validation accuracy among the main job's grid (ties: the smaller)
        grid = {float(lr): acc for lr, acc in r["lr_grid_val_acc"].items()}
        assert set(grid) == set(presets.QUICK_LR_GRIDS[r["optimizer"]])
        assert r["lr"] == min(lr for lr, acc in grid.items() if acc == max(grid.values()))
        assert 0.0 <= r["test_acc"]["mean"] <= 1.0 and len(r["curve"]) == 2
    # the small-to-large line of each rule is its test accuracy at 512 minus that at 64
    test_acc = {(r["optimizer"], r["batch_size"]): 100 * r["test_acc"]["mean"] for r in results}
    assert "mnist1d/mlp: test accuracy at batch 64 → 512" in printed
    for name in RULES:
        line = next(line for line in printed.splitlines() if line.startswith(f"  {name} ") and "→" in line)
        change = float(line.rsplit("(", 1)[1].rstrip(")"))
        assert change == pytest.approx(test_acc[name, 512] - test_acc[name, 64], abs=0.051)
    for name in ("overview.png", "accuracy_vs_batch.png"):
        assert str(out / name) in printed
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_job_runs_the_teacher_task_on_request(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--task", "teacher", "--train-size", "1024", "--epochs", "1", "--batch-sizes", "128", "512",
                      "--seeds", "1", "--lr-points", "1", "--jobs", "1", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = _table_rows(printed, "teacher/mlp")
    assert sorted((cols[2], cols[1]) for cols in rows) == sorted((name, b) for name in RULES for b in ("128", "512"))
    assert not _table_rows(printed, "mnist1d/mlp")
    assert (out / "overview.png").stat().st_size > 0


def test_main_job_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    text = capsys.readouterr().out
    assert "--preset" in text and "--batch-sizes" in text and "--out" in text and "(default: quick)" in text
