"""``python -m bench --distributed`` before and after the fused sharded median, interleaved:
A runs the median's selection of cblr_ext/distributed.py at BEFORE (main before the change:
keys formed with torch ops per layer, a bincount per layer and round; read from git), B today's (the op
``median_histogram``); everything else is the same build.  Run from the repository root:
``PYTHONPATH=. python bench/results/ab-sharded-median/ab.py`` (writes runs.json here)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEFORE = "bc1a951"  # the commit whose selection A runs


def _use_before():
    """Replace the median's selection by the one before the change, in this process (the
    spawned ranks import this file again and do the same)."""
    from cblr_ext import distributed
    source = subprocess.run(["git", "show", f"{BEFORE}:cblr_ext/distributed.py"], cwd=HERE, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("cblr_ext._distributed_before", loader=None)
    before = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    before.__package__ = "cblr_ext"
    exec(compile(source, f"{BEFORE}:cblr_ext/distributed.py", "exec"), before.__dict__)
    distributed._MedianSelect = lambda g, reduction, grad_scale=None: before._MedianSelect(g, reduction)


if os.environ.get("AB_VARIANT") == "A":
    _use_before()


def _one() -> dict:
    import torch
    from bench import distributed, machine
    load = machine.load_average()
    result = distributed.run(small=False)
    result.update(torch=torch.__version__, load_average_before=load, load_average_after=machine.load_average())
    return result


if __name__ == "__main__":
    if sys.argv[1:] == ["--one"]:
        print(json.dumps(_one()))
        sys.exit(0)
    runs = []
    for variant in "ABAB":
        out = subprocess.run([sys.executable, __file__, "--one"], env={**os.environ, "AB_VARIANT": variant},
                             check=True, capture_output=True, text=True).stdout
        runs.append(dict(variant=variant, **json.loads(out.strip().splitlines()[-1])))
        print(variant, {rule: round(row["sharded_ms"], 1) for rule, row in runs[-1]["rows"].items()}, flush=True)
    (HERE / "runs.json").write_text(json.dumps(runs, indent=1))
