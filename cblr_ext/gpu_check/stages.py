"""The stages of the GPU check, in order, each with its time limit (the one source of the
budget; docs/gpu_check.md shows the same table): what runs on a GPU machine, and what
the dry run without a GPU runs instead (None: skipped, with the reason).

A stage's command is built from a ``Context`` once the probe has read the machine:
a list of argument vectors run in turn (the first failure ends the stage) and the
environment variables added for it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# Every stage runs with this: an extension that is not built is reported by the stage
# that needs it, not JIT-built (for every architecture) outside the build stage's limit.
BASE_ENV = {"CBLR_EXT_NO_JIT": "1", "PYTHONUNBUFFERED": "1"}
PROBE_FILE = "probe.json"


@dataclass(frozen=True)
class Context:
    out: Path          # OUT_DIR
    repo: Path         # the checkout (tests/, bench/)
    python: str        # the interpreter that runs every stage
    machine: dict = field(default_factory=dict)  # probe.machine() of this machine ({} before the probe)
    stage: str = ""    # the stage being built

    @property
    def junit(self) -> Path:
        return self.out / f"{self.stage}.xml"

    @property
    def artifacts(self) -> Path:
        return self.out / self.stage


@dataclass(frozen=True)
class Command:
    steps: list        # [[argv...], ...], run in turn
    env: dict = field(default_factory=dict)


Builder = Callable[[Context], Command]


@dataclass(frozen=True)
class Stage:
    name: str
    what: str
    limit_s: float
    gpu: Optional[Builder]           # on a GPU machine (None: not run there)
    dry: Optional[Builder] = None    # without a GPU (None: skipped)
    skip_reason: str = "no GPU"      # why the dry run skips it
    needs: tuple = ()                # stages that must have passed first

    def builder(self, dry_run: bool) -> Optional[Builder]:
        return self.dry if dry_run else self.gpu


def arch_list(capability) -> str:
    """TORCH_CUDA_ARCH_LIST for one GPU: its compute capability, e.g. (9, 0) -> "9.0"."""
    major, minor = capability
    return f"{major}.{minor}"


def build_env(machine: dict) -> dict:
    """The build's environment: the present GPU's architecture only, every core."""
    return {"TORCH_CUDA_ARCH_LIST": arch_list(machine["gpu"]["capability"]),
            "MAX_JOBS": str(machine["cpu_count"])}


def probe(require=None) -> Builder:
    def build(ctx):
        file = ctx.out / (PROBE_FILE if require is None else f"{ctx.stage}.json")
        return Command([[ctx.python, "-m", "cblr_ext.gpu_check.probe", str(file),
                         *(["--require", require] if require else [])]])
    return build


def install(ctx) -> Command:
    pip = [ctx.python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    return Command([pip, probe("cuda")(ctx).steps[0]], build_env(ctx.machine))


def pytest(*selection, env=None) -> Builder:
    def build(ctx):
        return Command([[ctx.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                         f"--junitxml={ctx.junit}", *selection]], dict(env or {}))
    return build


def bench(*options, device="cuda") -> Builder:
    """``python -m bench`` of the check: kernel launches counted, a short sampling budget
    per case, no torch.compile cases (the compile stage covers compilation)."""
    def build(ctx):
        return Command([[ctx.python, "-m", "bench", "--device", device, "--no-compile", "--launches", "--quiet",
                         "--out", str(ctx.artifacts), *options]])
    return build


BENCH_CASE_SECONDS = "0.2"
# The Triton interpreter at small size: a few parity and median tests (the full file on a GPU).
TRITON_INTERPRETER_SUBSET = ("tests/test_triton_backend.py", "-k",
                             "test_parity_with_reference_over_ten_steps and (LARS-momentum or MCLR-momentum "
                             "or CBLR-momentum) or test_probe_ops_match_reference_bit_exactly")

STAGES = (
    Stage("probe", "versions, cores, the GPU and its compute capability", 15, probe(), probe()),
    Stage("build", "pip install -e . for this GPU's architecture only (MAX_JOBS = all cores); the CUDA "
          "extension must load", 110, install, probe("cpu"), needs=("probe",)),
    Stage("cuda-tests", "tests/test_cuda_backend.py: parity table, real sizes, the exact median on adversarial "
          "data, CUDA-graph replay, no host sync", 60, pytest("tests/test_cuda_backend.py"), needs=("build",)),
    Stage("lamb-tests", "tests/test_lamb_cuda.py: LAMB and the Adam-base MCLR on the CUDA kernels against the "
          "formula, the reference element-wise and the C++ kernels bit for bit; skipped steps, GradScaler, no host "
          "sync", 20, pytest("tests/test_lamb_cuda.py"), needs=("build",)),
    Stage("triton-tests", "tests/test_triton_backend.py, compiled on the GPU (dry run: a small interpreter subset)",
          60, pytest("tests/test_triton_backend.py"), pytest(*TRITON_INTERPRETER_SUBSET, env={"TRITON_INTERPRET": "1"}),
          needs=("build",)),
    Stage("compile-tests", "tests/test_compile.py -k gpu: torch.compile and CUDA-graph replay on the GPU", 40,
          pytest("tests/test_compile.py", "-k", "gpu"), needs=("build",)),
    Stage("amp-sync-masters", "tests/test_amp.py, test_no_sync.py, test_master_weights.py (GradScaler in a CUDA "
          "graph; their CPU parts on this torch) and the bench's kernel-launch counter", 25,
          pytest("tests/test_amp.py", "tests/test_no_sync.py", "tests/test_master_weights.py",
                 "tests/test_gpu_check.py::test_kernel_launches_of_known_steps"), needs=("build",)),
    Stage("bench-resnet50", "python -m bench: ResNet-50 shapes, fp32 and bf16, every rule and backend beside "
          "fused SGD/AdamW, launches per step (dry run: the tiny suite on the CPU)", 60,
          bench("--suite", "resnet50", "--dtype", "fp32", "--dtype", "bf16", "--case-seconds", BENCH_CASE_SECONDS),
          bench("--suite", "tiny", "--dtype", "fp32", "--backend", "cpp", "--quick", "--warm-cache", "--case-seconds",
                "0.02", device="cpu"),
          needs=("build",)),
    Stage("bench-bert-large", "python -m bench: BERT-large shapes, fp32", 50,
          bench("--suite", "bert-large", "--dtype", "fp32", "--case-seconds", BENCH_CASE_SECONDS), needs=("build",)),
    Stage("bench-gpt2", "python -m bench: GPT-2 shapes, fp32", 40,
          bench("--suite", "gpt2-small", "--dtype", "fp32", "--case-seconds", BENCH_CASE_SECONDS), needs=("build",)),
)
# The whole check's limit: every stage at its limit (the budget is 8 minutes).
BUDGET_S = sum(s.limit_s for s in STAGES)


def read_machine(out: Path) -> dict:
    """The probe's findings ({} if it wrote none)."""
    try:
        return json.loads((out / PROBE_FILE).read_text())
    except (OSError, ValueError):
        return {}
