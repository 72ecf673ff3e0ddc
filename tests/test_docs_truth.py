"""The README and docs/ say what is true today: no internal issue numbers, no capability
described as missing that the code has, install commands with the flag the build needs.

Each claim below pairs the wording that would call a capability missing with a check of
the code that it exists; each pattern is shown to catch an example of the stale wording,
so a test here can fail."""
import pathlib
import re
import tomllib

import pytest
import torch

from cblr_ext import CBLR, LARS, MCLR
from cblr_ext.experiments.presets import preset_config
from cblr_ext.hyperparams import BACKENDS

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]

# "issue 21", "issues 16 and 21", "(issue 20, item 10)", "#16" (not a heading, anchor or `# comment`)
ISSUE_NUMBER = re.compile(r"\b[Ii]ssues?\s*#?\d+|(?<![\w&/#`(])#\d+\b")


def _sentences(text):
    # a sentence ends at ". " or a blank line; code spans keep their dots (torch.compile)
    return re.split(r"(?<=[.!?])\s+(?=[A-Z`(*])|\n\s*\n", text)


def _text(path):
    return path.read_text(encoding="utf-8")


CLAIMS = [
    ("GradScaler unscaling inside the kernels",
     r"GradScaler[^.]*\bnot\b[^.]*\b(yet|there|supported)\b",
     "GradScaler unscaling inside the kernels is not there yet (issue 16).",
     lambda: all(cls._step_supports_amp_scaling for cls in (LARS, MCLR, CBLR))),
    ("a CUDA backend",
     r"\bCUDA (backend|kernels?)\b[^.]*\b(not (yet )?(there|implemented|written|available)|missing)\b",
     "The CUDA backend is not implemented yet.",
     lambda: "cuda" in BACKENDS and (ROOT / "csrc" / "cuda").is_dir()),
    ("master weights",
     r"master[ _]weights[^.]*\bnot (yet )?(supported|there|implemented)\b",
     "master_weights is not supported yet.",
     lambda: all(_keeps_fp32_masters(cls) for cls in (LARS, MCLR, CBLR))),
    ("the main job on MNIST-1D",
     r"main job[^.]{0,80}\bteacher task at batch",
     "The package's main job, `python -m cblr_ext` (the `quick` preset: the teacher task at batch 128 and 8192",
     lambda: preset_config("quick").tasks == [("mnist1d", "mlp")]),
    ("the study extra for mnist1d",
     r"\[study\][^.]{0,40}\badds?\b[^.]{0,40}\bmnist1d\b",
     '`pip install -e ".[study]"` adds scikit-learn and `mnist1d`.',
     lambda: "mnist1d" in _install_requires()),
]


def _keeps_fp32_masters(cls):
    weight = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    weight.grad = torch.full_like(weight, 0.5)
    opt = cls([weight], lr=0.1, master_weights=True, backend="reference")
    opt.step()
    master = opt.state[weight].get("master")
    return master is not None and master.dtype == torch.float32


def _install_requires():
    found = re.search(r"install_requires=\[(.*?)\]", _text(ROOT / "setup.py"), re.S)
    return re.findall(r'"([^"]+)"', found.group(1))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_internal_issue_numbers(path):
    hits = [(n, line.strip()) for n, line in enumerate(_text(path).splitlines(), 1) if ISSUE_NUMBER.search(line)]
    assert not hits, f"{path.name}: say what a thing does, not which issue asked for it: {hits}"


@pytest.mark.parametrize("example", ["(issue 16).", "since issue 21", "issues 16 and 21", "see #16",
                                     "issue #3", "(issue 20, item 10)"])
def test_issue_pattern_catches_the_usual_forms(example):
    assert ISSUE_NUMBER.search(example)


@pytest.mark.parametrize("example", ["## MNIST-1D", "[link](#mnist-1d)", "python x.py  # 18 minutes",
                                     "sm_80, sm_90", "a 2-core VM"])
def test_issue_pattern_spares_headings_anchors_and_numbers(example):
    assert not ISSUE_NUMBER.search(example)


@pytest.mark.parametrize("name, pattern, stale, exists", CLAIMS, ids=[c[0] for c in CLAIMS])
def test_no_capability_the_code_has_is_called_missing(name, pattern, stale, exists):
    assert exists(), f"{name}: the code no longer has it; revisit this claim and the docs"
    claim = re.compile(pattern, re.I)
    assert claim.search(stale), "the pattern must catch the stale wording it stands for"
    for path in DOCS:
        hits = [s.strip() for s in _sentences(_text(path)) if claim.search(s)]
        assert not hits, f"{path.name} calls {name} missing, which the code has: {hits}"


def test_editable_installs_use_the_flags_the_build_needs():
    """The build requires torch (pyproject.toml), so an isolated build downloads another
    torch: every documented editable install passes --no-build-isolation."""
    build_requires = tomllib.loads(_text(ROOT / "pyproject.toml"))["build-system"]["requires"]
    assert any(req.startswith("torch") for req in build_requires)
    commands = [m.group(0) for path in [*DOCS, ROOT / "bench" / "README.md"]
                for m in re.finditer(r"pip install[^`\n&]*-e\b[^`\n&]*", _text(path))]
    assert commands
    assert all("--no-build-isolation" in c for c in commands), [c for c in commands if "--no-build-isolation" not in c]
