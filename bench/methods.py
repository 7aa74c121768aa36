"""The rows of the throughput benchmark and the check every row passes before it is timed.

A ``Method`` is one row: how to build it on a model's parameters (``baselines.py``'s classes, or
``tsam_fast.TSAM`` with one backend) and which configuration of the reference optimizer it must match.
``all_methods`` lists ERM, SAM, the two TSAM baselines and a tsam_fast row per backend that runs on the
device; ``check_methods`` steps each row twice next to ``plain_oracle`` (tsam_fast's optimizer on
``ReferenceOps``, the plain definition) and raises ``CheckFailed`` naming every row that disagrees.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

import tsam_fast
from tsam_fast.backends import Backend
from tsam_fast.backends.noise import NoiseGenerator
from tsam_fast.backends.reference import REFERENCE_DTYPES, ReferenceOps
from tsam_fast.backends.reference_fast import FastReferenceBackend, FastReferenceOps, ReferenceBackend
from baselines import ERM, SAM, AuthorsTSAM, FastTSAM, ForeachTSAM, PhiloxNoise, TSAMConfig, tsam_oracle
from harness import Progress
from models import ModelSpec, Workload, build

#: a ``flat`` model above this many parameters is checked on a twin of this size (``check_twin``)
CHECK_FLAT_MAX = 2_000_003


class CheckFailed(RuntimeError):
    """A method's update disagrees with the reference: its timing would be meaningless."""


@dataclass
class Method:
    """A row of the table: how to build it on a model's parameters and which oracle checks it.

    ``make(params, cfg, noise)`` returns an object with ``step(closure)``, ``calls_per_step`` and
    ``held_bytes()``; ``loop`` rows drive tsam_fast's ``begin_step()`` loop instead of ``step(closure)``."""

    key: str
    label: str
    oracle: str  # "erm", "sam" or "tsam": the reference TSAM configuration it must match
    make: Callable
    loop: bool = False


ORACLES = {
    "erm": dict(num_samples=1, sampler="random", start="none"),
    "sam": dict(num_samples=1, sampler="ascent", start="none"),
    "tsam": dict(),
}


def available_backends() -> List[str]:
    return [name for name, st in tsam_fast.backend_info().items() if st.available]


def auto_backend(device: torch.device) -> str:
    probe = torch.zeros(1, device=device, requires_grad=True)
    return tsam_fast.TSAM([probe], torch.optim.SGD, lr=0.0).backend_name(device)


class _OwnReference(FastTSAM):
    """tsam_fast with the reference backend on a backend object of its own (``TSAM(backend=<Backend>)``): its
    kept buffers (``held_bytes``) are this optimizer's alone; the compiled generator is the shared one
    (``ReferenceBackend()``), and ``eager=True`` gives it the generator of a machine without a compiler (the
    same path as ``TSAM_FAST_COMPILE=0``)."""

    def __init__(self, params, cfg, noise=None, *, eager: bool = False, check_finite: bool = False):
        backend = FastReferenceBackend(FastReferenceOps(NoiseGenerator(compile=False))) if eager else ReferenceBackend()
        super().__init__(params, cfg, noise, backend=backend, check_finite=check_finite)


def tsam_fast_methods(device: torch.device, backends: Optional[Sequence[str]], check_finite: bool,
                      eager_reference: bool, loops: bool) -> List[Method]:
    info = tsam_fast.backend_info()
    names = [n for n in (backends or available_backends())
             if info[n].available and ("any" in info[n].devices or device.type in info[n].devices)]
    auto = auto_backend(device)
    out = []
    for name in names:
        label = f"tsam_fast {name}" + (" (auto)" if name == auto else "")
        if name == "reference":
            def make(params, cfg, noise, _eager=False):
                return _OwnReference(params, cfg, noise, eager=_eager, check_finite=check_finite)
            out.append(Method("tsam_fast_reference", label, "tsam", make))
            if eager_reference:
                out.append(Method("tsam_fast_reference_eager", "tsam_fast reference, no compiler (eager)", "tsam",
                                  lambda p, c, n, _make=make: _make(p, c, n, _eager=True)))
        else:
            def make(params, cfg, noise, _name=name):
                return FastTSAM(params, cfg, backend=_name, check_finite=check_finite)
            out.append(Method(f"tsam_fast_{name}", label, "tsam", make))
        if loops:
            out.append(Method(f"tsam_fast_{name}_loop", f"tsam_fast {name}, begin_step() loop", "tsam",
                              out[-1 if name != "reference" or not eager_reference else -2].make, loop=True))
    return out


def all_methods(device: torch.device, backends: Optional[Sequence[str]] = None, check_finite: bool = False,
                eager_reference: bool = False, loops: bool = False) -> List[Method]:
    """ERM, SAM, the two TSAM baselines and the tsam_fast rows of every backend that runs on ``device``."""
    return [
        Method("erm", "ERM (base optimizer)", "erm", ERM),
        Method("sam", "SAM", "sam", SAM),
        Method("tsam_authors", "TSAM authors'-style", "tsam", AuthorsTSAM),
        Method("tsam_foreach", "TSAM foreach", "tsam", ForeachTSAM),
    ] + tsam_fast_methods(device, backends, check_finite, eager_reference, loops)


def make_closure(workload: Workload, model: torch.nn.Module):
    """The closure every row steps with: the workload's loss on ``model``, backward included."""
    def closure():
        loss = workload.loss(model)
        loss.backward()
        return loss
    return closure


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def run_step(opt, closure, loop: bool):
    """One step of a row: ``opt.step(closure)``, or tsam_fast's ``begin_step()`` loop for a ``loop`` row."""
    if not loop:
        return opt.step(closure)
    run = opt.opt.begin_step()
    for _ in run:
        run.record(closure())
    return run.finish()


# Rounding a parameter after its update may land one ulp either way whenever two correct
# implementations' gradients differ in the last bits (e.g. LayerNorm weights near 1.0 moved by 1e-3).
ULP_ALLOWANCE = 4 * torch.finfo(torch.float32).eps


@contextlib.contextmanager
def _full_fp32():
    """TF32 off while checking: it rounds matmul/conv inputs to 10 bits, so two correct methods whose
    perturbed parameters differ in the last bit could round some products differently."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def sensitive_config(workload: Workload, cfg: TSAMConfig) -> TSAMConfig:
    """The benchmark's hyperparameters with the tilt made visible, for the second correctness check.

    At the timed settings the samples' losses differ by ~1e-4 on a large model, so the weights are
    ~uniform and a method that gets them wrong still matches. Perturbations of 5% of the parameter
    norm and t = 20 make the weights clearly non-uniform while keeping the amplification of float
    rounding in the losses (t * |L| * 1e-7) far below the tolerance.
    """
    norm = torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1).float()
                                               for p in workload.make_model().parameters()])).item()
    out = copy.copy(cfg)
    out.tilt, out.radius, out.rho = 20.0, 0.05 * norm, 0.05 * norm
    return out


def plain_oracle(params, cfg: TSAMConfig, **kwargs) -> tsam_fast.TSAM:
    """``tsam_oracle`` on ``ReferenceOps`` itself, the plain definition (not the fast fallback that
    ``backend="reference"`` runs), so that the reference rows are checked too."""
    return tsam_oracle(params, cfg, backend=Backend("reference", ReferenceOps(), REFERENCE_DTYPES), **kwargs)


def check_twin(workload: Workload, device: torch.device, seed: int) -> Workload:
    """The workload the check runs on: ``workload`` itself, or for a ``flat`` model above ``CHECK_FLAT_MAX``
    parameters a twin of that size with the same tensors (the plain reference's generator launches ~300
    kernels per 256k elements: minutes at 500M on a GPU)."""
    spec = workload.spec
    if spec.kind != "flat" or spec.options["numel"] <= CHECK_FLAT_MAX:
        return workload
    return build(ModelSpec("flat", dict(spec.options, numel=CHECK_FLAT_MAX)), device, seed=seed)


def check_methods(workload: Workload, cfg: TSAMConfig, methods: Sequence[Method], steps: int = 2,
                  rtol: float = 1e-4, progress: Optional[Progress] = None, tag: str = "") -> Dict[str, dict]:
    """Run ``steps`` steps of every method with tsam_fast's noise and compare with the reference TSAM
    (``plain_oracle``: ``ReferenceOps``, the definition).

    Two configurations: the timed one and ``sensitive_config``'s (both with SGD as the base optimizer). The error is measured on the
    parameter change ``d = theta_after - theta_before``, relative to its largest element (a relative
    error on the parameters themselves would hide a wrong update under their magnitude), after
    allowing ``ULP_ALLOWANCE`` of each stored parameter: ``max(|theta - theta_ref| - 4 eps |theta_ref|)
    / max|d_ref|``. The returned losses are compared too. Raises ``CheckFailed`` naming every method
    that is off by more than ``rtol``. ``progress`` notes each method and setting as checked, tagged ``tag``.
    """
    if cfg.base_optimizer is not torch.optim.SGD:
        # Adam-like optimizers take lr * sign(g) at first: a rounding-level difference in a near-zero
        # gradient becomes a full-size update difference. The base optimizer is torch's own in every
        # row; what the check must pin down is the gradient handed to it, which SGD passes on linearly.
        cfg = copy.copy(cfg)
        cfg.base_optimizer, cfg.base_kwargs = torch.optim.SGD, dict(lr=0.01, momentum=0.9)
    init = flat_params(workload.make_model())

    def run(make, loop=False):
        model = workload.make_model()
        opt = make(list(model.parameters()))
        closure = make_closure(workload, model)
        losses = torch.stack([torch.as_tensor(run_step(opt, closure, loop)).detach().float().cpu()
                              for _ in range(steps)])
        return flat_params(model), losses

    report, failures = {}, []
    with _full_fp32():
        for name, c in (("timed", cfg), ("tilt_sensitive", sensitive_config(workload, cfg))):
            refs = {}
            report[name] = {}
            for m in methods:
                t_row = time.perf_counter()
                if m.oracle not in refs:
                    refs[m.oracle] = run(lambda ps: plain_oracle(ps, c, **ORACLES[m.oracle]))
                want, want_loss = refs[m.oracle]
                got, got_loss = run(lambda ps: m.make(ps, c, PhiloxNoise(c.seed)), m.loop)
                off = ((got - want).abs() - ULP_ALLOWANCE * want.abs()).clamp_min(0).max()
                err = (off / (want - init).abs().max().clamp_min(1e-30)).item()
                loss_err = ((got_loss - want_loss).abs() / want_loss.abs().clamp_min(1e-30)).max().item()
                ok = err <= rtol and loss_err <= rtol  # NaN compares False: a NaN fails
                report[name][m.key] = dict(update_rel_err=err, loss_rel_err=loss_err, passed=ok)
                if progress is not None:
                    progress.note(f"{tag}: check, {name} settings: {m.key} {'ok' if ok else 'DISAGREES'} "
                                  f"(error {err:.1e}; {time.perf_counter() - t_row:.1f} s)")
                if not ok:
                    failures.append(f"{m.key} ({name} settings: t={c.tilt:g}, r={c.radius:.3g}, rho={c.rho:.3g}): "
                                    f"parameter change off by {err:.3g} (relative to its largest element), "
                                    f"loss off by {loss_err:.3g}")
    if failures:
        raise CheckFailed(
            f"{workload.spec.name}: {len(failures)} check(s) disagree with the reference TSAM after {steps} "
            f"steps (tolerance {rtol:g}):\n  " + "\n  ".join(failures)
            + "\nA benchmark of a wrong answer is worthless: fix the method (or its backend) before timing it.")
    return report

