"""Build script: the Python package, the Triton kernels (installed as
``cblr_ext.kernels``), the C++ extension ``cblr_ext._C`` (CPU kernels) and, when torch
has CUDA and nvcc is found, the CUDA extension ``cblr_ext._C_cuda`` (csrc/cuda/; for
sm_80, sm_90 and sm_100 unless TORCH_CUDA_ARCH_LIST says otherwise).  With the CPU
wheel of torch (torch.version.cuda is None) only the CPU extension is built."""
import importlib.util
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


def _build_config():
    """cblr_ext/_build.py (sources and flags, shared with the JIT build), loaded by path."""
    spec = importlib.util.spec_from_file_location("cblr_ext_build", "cblr_ext/_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _build_config()


def _extensions():
    ext = [CppExtension("cblr_ext._C", [f"csrc/{src}" for src in _build.SOURCES],
                        extra_compile_args=_build.CXX_FLAGS, extra_link_args=_build.LINK_FLAGS)]
    reason = _build.cuda_build_reason()  # sets CUDA_HOME from the nvcc on PATH when unset
    if reason is not None:
        print(f"cblr_ext: building the CPU extension only ({reason})", file=sys.stderr)
        return ext
    from torch.utils.cpp_extension import CUDAExtension
    ext.append(CUDAExtension("cblr_ext._C_cuda", [f"csrc/{src}" for src in _build.CUDA_SOURCES],
                             include_dirs=_build.cuda_include_dirs(),
                             extra_compile_args={"cxx": _build.CUDA_CXX_FLAGS, "nvcc": _build.NVCC_FLAGS}))
    return ext


setup(
    name="cblr_ext",
    version="0.1.0",
    description="Curvature-based layer-wise learning rates (CBLR, MCLR, LARS) for large-batch training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["cblr_ext", "cblr_ext.backends", "cblr_ext.kernels", "cblr_ext.train", "cblr_ext.experiments"],
    package_dir={"cblr_ext.kernels": "kernels"},
    # numpy: torch warns on import without it; matplotlib, mnist1d: the main job (python -m cblr_ext) plots, on MNIST-1D
    install_requires=["torch>=2.6", "tqdm", "numpy", "matplotlib", "mnist1d"],
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
    extras_require={
        # The Triton backend's tests run its kernels on the CPU (TRITON_INTERPRET=1);
        # the bench smoke test needs the report's and the microbenchmarks' packages.
        # scikit-learn: the experiment smoke test's digits data set; hypothesis: property tests.
        "test": ["pytest", "numpy", "scipy", "triton", "matplotlib", "pytest-benchmark", "pytorch-optimizer",
                 "scikit-learn", "hypothesis"],
        "triton": ["triton"],
        # the full study (python -m cblr_ext.experiments): digits needs scikit-learn, mnist1d generates MNIST-1D
        "study": ["scikit-learn", "mnist1d"],
        "bench": ["numpy", "scipy", "pytest-benchmark", "matplotlib", "pytorch-optimizer"],
    },
)
