"""Build script: the Python package, the Triton kernels (installed as
``cblr_ext.kernels``) and the C++/CUDA extension ``cblr_ext._C``."""
from setuptools import setup

setup(
    name="cblr_ext",
    version="0.1.0",
    description="Curvature-based layer-wise learning rates (CBLR, MCLR, LARS) for large-batch training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["cblr_ext", "cblr_ext.backends", "cblr_ext.kernels"],
    package_dir={"cblr_ext.kernels": "kernels"},
    install_requires=["torch>=2.6", "tqdm"],
    extras_require={
        # The Triton backend's tests run its kernels on the CPU (TRITON_INTERPRET=1).
        "test": ["pytest", "numpy", "triton"],
        "triton": ["triton"],
        "bench": ["pytest-benchmark", "matplotlib", "pytorch-optimizer"],
    },
)
