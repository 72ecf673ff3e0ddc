"""Step-level microbenchmarks: one ``opt.step()`` of each case of the report
(``case`` is parametrized in conftest.py)."""
import pytest

from bench import runner


@pytest.mark.benchmark(group="optimizer step")
def test_step(benchmark, case, tensors):
    step = runner.build(case, *tensors)
    benchmark(step.run)
