"""Shared fixtures of the pytest-benchmark microbenchmarks:
``python -m pytest bench/benchmarks [--bench-suite NAME] [--bench-small]``."""
import pytest
import torch

import cblr_ext

from bench import runner, suites


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
    """``backend``: every cblr_ext backend that runs on the benchmark device."""
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", cblr_ext.available_backends(metafunc.config.getoption("--bench-device")))
