"""Build script: the Python package, its Triton kernels (kernels/ -> tsam_fast._kernels) and the C++ CPU
extension (csrc/ -> tsam_fast._C, the operators torch.ops.tsam_fast.*).

The extension is built against the installed torch, so install with ``pip install --no-build-isolation``.
If torch is not importable or the build fails (no compiler, no ninja), the package still installs and
tsam_fast compiles the extension just in time on first use, or falls back to the reference backend
(see tsam_fast/backends/cpp.py).
"""

import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _cpp_extension():
    """(ext_modules, cmdclass) of the C++ extension, or ([], {}) when it cannot be built here."""
    if os.environ.get("TSAM_FAST_NO_CPP") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch missing: the JIT path or the reference backend takes over at run time
        print(f"tsam_fast: not building the C++ extension ({type(exc).__name__}: {exc})", file=sys.stderr)
        return [], {}
    cxx_flags, ld_flags = _flags_of_jit_build()
    sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cpp"))
    ext = CppExtension("tsam_fast._C", sources, extra_compile_args=cxx_flags, extra_link_args=ld_flags)
    return [ext], {"build_ext": _OptionalBuildExt.with_base(BuildExtension)}


def _flags_of_jit_build():
    """CXX_FLAGS and LD_FLAGS of tsam_fast/backends/cpp.py (one definition for both builds), read without
    importing the package."""
    import ast

    tree = ast.parse((HERE / "tsam_fast" / "backends" / "cpp.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("CXX_FLAGS", "LD_FLAGS"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found["CXX_FLAGS"], found["LD_FLAGS"]


class _OptionalBuildExt:
    """A build_ext that reports a failed C++ build instead of failing the install."""

    @staticmethod
    def with_base(base):
        class OptionalBuildExt(base):
            def run(self):
                try:
                    super().run()
                except Exception as exc:
                    print(f"tsam_fast: the C++ extension was not built ({type(exc).__name__}: {exc}); "
                          "it will be compiled on first use if a compiler is available", file=sys.stderr)

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:
                    print(f"tsam_fast: building {ext.name} failed ({type(exc).__name__}: {exc}); "
                          "it will be compiled on first use if a compiler is available", file=sys.stderr)

        return OptionalBuildExt.with_options(use_ninja=True) if hasattr(OptionalBuildExt, "with_options") \
            else OptionalBuildExt


ext_modules, cmdclass = _cpp_extension()

setup(
    packages=["tsam_fast", "tsam_fast.backends", "tsam_fast.integrations", "tsam_fast._kernels"],
    package_dir={"tsam_fast._kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
