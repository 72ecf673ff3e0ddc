"""The README's usage examples run, and the main job (the demo) compares every rule at a
small and a large batch."""
import pathlib
import re

import pytest

from cblr_ext import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_usage_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    stats = namespace["opt"].layer_stats()
    assert stats and all(s["ratio"] > 0 for s in stats.values())


def test_demo_compares_every_rule_and_explains_its_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--train-size", "1024", "--epochs", "1", "--batch-sizes", "128", "512", "--seeds", "1", "--lr-points", "1",
                      "--jobs", "1", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.startswith("mnist1d/mlp ")]
    # every rule at the small and the large batch, none diverged
    assert sorted((cols[2], cols[1]) for cols in rows) == sorted(
        (name, batch) for name in ("SGD", "LARS", "MCLR", "CBLR-k1") for batch in ("128", "512"))
    assert not any("diverged" in " ".join(cols) for cols in rows)
    for column in ("lr ", "steps", "train", "test", "gap", "wall s"):
        assert f"\n  {column}" in printed
    assert str(out / "accuracy_vs_batch.png") in printed and (out / "accuracy_vs_batch.png").stat().st_size > 0


def test_main_job_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    text = capsys.readouterr().out
    assert "--preset" in text and "--batch-sizes" in text and "--out" in text and "(default: quick)" in text
