"""``python -m bench --distributed`` before and after the gathered candidates, interleaved:
A runs main's median selection (cblr_ext/distributed.py's ``_MedianSelect`` at BEFORE, read
from git: every round a full ``median_histogram`` pass over w and g), B this branch's (the
second round gathers the candidate keys, the rounds after it count those alone);
everything else is the same build.  Run from the repository root:
``PYTHONPATH=. python bench/results/sharded-median/ab.py [PAIRS]`` (writes runs.json here)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEFORE = "149b696"  # main when this branch started


def _use_before():
    """Replace the median's selection by main's, in this process (the spawned ranks import
    this file again and do the same)."""
    from cblr_ext import distributed
    source = subprocess.run(["git", "show", f"{BEFORE}:cblr_ext/distributed.py"], cwd=HERE, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("cblr_ext._distributed_before", loader=None)
    before = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    before.__package__ = "cblr_ext"
    exec(compile(source, f"{BEFORE}:cblr_ext/distributed.py", "exec"), before.__dict__)
    distributed._MedianSelect = before._MedianSelect


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
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    runs = []
    for variant in "AB" * pairs:
        out = subprocess.run([sys.executable, __file__, "--one"], env={**os.environ, "AB_VARIANT": variant},
                             check=True, capture_output=True, text=True).stdout
        runs.append(dict(variant=variant, **json.loads(out.strip().splitlines()[-1])))
        print(variant, {rule: (round(row["single_ms"], 1), round(row["sharded_ms"], 1), row["collectives"])
                        for rule, row in runs[-1]["rows"].items()}, flush=True)
        (HERE / "runs.json").write_text(json.dumps(runs, indent=1))
