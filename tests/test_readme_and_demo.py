"""The README's usage examples run, and the demo trains every rule to a finite,
lower loss."""
import pathlib
import re

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


def test_demo_trains_every_rule(capsys):
    assert demo.main(["--batch-size", "512", "--steps", "25", "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("SGD", "LARS", "MCLR", "CBLR")}
    assert set(rows) == {"SGD", "LARS", "MCLR", "CBLR"}
    for name, cols in rows.items():
        first, final = float(cols[2]), float(cols[3])
        assert final < first, name
