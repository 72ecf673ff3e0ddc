"""Step-level microbenchmarks: one ``opt.step()`` of every case of the report
(``bench.cases``) except the torch.compile ones (``python -m bench`` times those
in a child process under a time limit)."""
import pytest

from bench import runner
from bench.cases import all_cases

STEP_CASES = [c for c in all_cases("cpu", compile_reference=False)[0]]


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{c.optimizer}-{c.backend}-{c.variant}")
@pytest.mark.benchmark(group="optimizer step")
def test_step(benchmark, case, tensors):
    step = runner.build(case, *tensors)
    benchmark(step.run)
