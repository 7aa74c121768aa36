"""The Triton launchers as the op contract: ``LAUNCHERS`` maps each op of ``tsam_fast.backends.contract``
to its launcher (``launch``), with the schema's arguments, and importing this module registers them as
``torch.ops.tsam_fast_triton.*`` from the same table (schemas, mutations, fake kernels), so that
``torch.compile`` sees opaque ops with their mutations declared instead of tracing the launchers' Python.

The namespace is not ``tsam_fast``: that one holds the C++ extension's CPU kernels (csrc/ops.cpp), and
the Triton backend must work whether or not that extension is built. Both namespaces share one schema
per op. The backend (``TritonOps``) calls the launchers directly in eager mode (a registered op costs a
dispatcher round trip per call) and these ops while it is being compiled; both run the same launcher.

The wrappers pass their arguments through unchanged (a ``theta``/``x`` list stays the list of the
parameters' own tensors: each launcher makes one launch over all of them), except ``runs``, turned into
``(buffer_offset, global_offset, length)`` triples.
"""

from __future__ import annotations

from ..backends import contract
from . import launch

NAMESPACE = "tsam_fast_triton"
_triples = contract.run_triples  # the launchers take runs as (buffer_offset, global_offset, length) triples


def noise_sqnorm(runs, seed, device):
    return launch.noise_sqnorm(_triples(runs), seed, device)


def sqnorm(x, scale=None):
    return launch.sqnorm(x, scale)


def perturb(theta, theta0, runs, seed, coef, save_backup):
    launch.perturb(theta, theta0, _triples(runs), seed, coef, save_backup)


def fill_noise(out, runs, seed, coef):
    launch.fill_noise(out, _triples(runs), seed, coef)


def leapfrog(theta, grad, kick, drift, momentum=None, precond=None):
    launch.leapfrog(theta, grad, kick, drift, momentum, precond)


def tilt_accumulate(acc, grad, a, b, first, theta, theta0, runs, seed, coef):
    launch.tilt_accumulate(acc, grad, a, b, first, theta, theta0, _triples(runs), seed, coef)


def finalize(acc, grad, a, b, inv_z, first, theta, theta0):
    launch.finalize(acc, grad, a, b, inv_z, first, theta, theta0)


LAUNCHERS = {op.name: globals()[op.name] for op in contract.OPS}

contract.register(NAMESPACE, LAUNCHERS)
