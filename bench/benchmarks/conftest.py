"""Shared fixtures of the pytest-benchmark microbenchmarks:
``python -m pytest bench/benchmarks [--bench-suite NAME] [--bench-small]``."""
import pytest
import torch

import cblr_ext

from bench import runner, suites
from bench.cases import all_cases


def pytest_addoption(parser):
    parser.addoption("--bench-suite", default="resnet50", choices=list(suites.SUITES),
                     help="parameter suite of the microbenchmarks")
    parser.addoption("--bench-small", action="store_true", help="the suite at --small size")
    parser.addoption("--bench-device", default="cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device(request):
    return torch.device(request.config.getoption("--bench-device"))


@pytest.fixture(scope="session")
def suite(request):
    return suites.get(request.config.getoption("--bench-suite"), small=request.config.getoption("--bench-small"))


@pytest.fixture(scope="session")
def tensors(suite, device):
    """(parameters, gradient sets) in fp32, shared by every benchmark (each copies them)."""
    return runner.make_tensors(suite, torch.float32, device)


def pytest_generate_tests(metafunc):
    """``backend``: every cblr_ext backend that runs on the benchmark device;
    ``case``: every case of the report but the torch.compile ones (``python -m
    bench`` times those in a child process under a time limit)."""
    device = torch.device(metafunc.config.getoption("--bench-device"))
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", cblr_ext.available_backends(device))
    if "case" in metafunc.fixturenames:
        cases = all_cases(device, compile_reference=False)[0]
        metafunc.parametrize("case", cases, ids=[f"{c.optimizer}-{c.backend}-{c.variant}" for c in cases])
