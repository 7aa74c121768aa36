"""Build script: the Python package, its Triton kernels (kernels/ -> tsam_fast._kernels) and, in a
later release, the C++ CPU extension (csrc/)."""

from setuptools import setup

setup(
    packages=["tsam_fast", "tsam_fast.backends", "tsam_fast._kernels"],
    package_dir={"tsam_fast._kernels": "kernels"},
)
