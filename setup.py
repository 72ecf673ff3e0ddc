"""Build script: the Python package, the Triton kernels (installed as
``cblr_ext.kernels``) and the C++/CUDA extension ``cblr_ext._C``."""
import importlib.util

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


def _build_config():
    """cblr_ext/_build.py (sources and flags, shared with the JIT build), loaded by path."""
    spec = importlib.util.spec_from_file_location("cblr_ext_build", "cblr_ext/_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _build_config()

setup(
    name="cblr_ext",
    version="0.1.0",
    description="Curvature-based layer-wise learning rates (CBLR, MCLR, LARS) for large-batch training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["cblr_ext", "cblr_ext.backends", "cblr_ext.kernels", "cblr_ext.train", "cblr_ext.experiments"],
    package_dir={"cblr_ext.kernels": "kernels"},
    # numpy: torch warns on import without it; matplotlib: the main job (python -m cblr_ext) plots
    install_requires=["torch>=2.6", "tqdm", "numpy", "matplotlib"],
    ext_modules=[CppExtension("cblr_ext._C", [f"csrc/{src}" for src in _build.SOURCES],
                              extra_compile_args=_build.CXX_FLAGS, extra_link_args=_build.LINK_FLAGS)],
    cmdclass={"build_ext": BuildExtension},
    extras_require={
        # The Triton backend's tests run its kernels on the CPU (TRITON_INTERPRET=1);
        # the bench smoke test needs the report's and the microbenchmarks' packages.
        # scikit-learn: the experiment smoke test's digits data set; hypothesis: property tests.
        "test": ["pytest", "numpy", "scipy", "triton", "matplotlib", "pytest-benchmark", "pytorch-optimizer",
                 "scikit-learn", "hypothesis"],
        "triton": ["triton"],
        # the full study (python -m cblr_ext.experiments): its digits task needs scikit-learn
        "study": ["scikit-learn"],
        "bench": ["numpy", "scipy", "pytest-benchmark", "matplotlib", "pytorch-optimizer"],
    },
)
