"""The methods the throughput benchmark compares, behind one small interface.

Every method wraps a model's parameters and offers ``step(closure) -> loss`` (the closure computes the
loss and calls ``backward()``; it never zeroes gradients, each method does that its own way),
``calls_per_step`` and ``held_bytes()`` (the most bytes of tensors the method kept beyond parameters,
gradients and the base optimizer's state).

* ``ERM``: the base optimizer alone.
* ``SAM``: the widely used SAM loop (per-parameter Python loop, a backup of the parameters, one
  normalized ascent step), as in the TSAM authors' ``sam.py``.
* ``AuthorsTSAM``: a faithful re-implementation of the published TSAM loop (``tsam.py`` and
  ``train_tsam.py``'s ``random1`` sampler): per-parameter loops, a ``.item()`` per parameter for the
  noise norm and per sample for the loss, ``s`` gradient clones, softmax weights on the host.
* ``ForeachTSAM``: the same math in plain PyTorch at its best: ``torch._foreach_*`` ops, device
  scalars only (no host sync), streaming log-sum-exp accumulation into one accumulator, the noise
  drawn into the (idle) gradient buffers so the only extra memory is theta0 and the accumulator.
* ``FastTSAM``: ``tsam_fast.TSAM`` with one backend.

Noise: the baselines draw it from a ``NoiseSource``. ``PhiloxNoise`` gives exactly tsam_fast's noise
(``tsam_fast.rng``: stream ``stream_seed(seed, step, j, STREAM_START)``, global element offsets in
parameter order), which lets the benchmark check every method against the reference optimizer.
``TorchNoise`` is torch's own generator, which is what the published code and a plain-PyTorch user
call; tsam_fast's reference Philox is written in int64 tensor ops and is ~10x slower than
``torch.randn`` on a CPU, so timing the baselines with it would flatter tsam_fast.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Union

import torch

from tsam_fast import TSAM, rng
from tsam_fast.backends import Backend

__all__ = ["TSAMConfig", "NoiseSource", "PhiloxNoise", "TorchNoise", "ERM", "SAM", "AuthorsTSAM",
           "ForeachTSAM", "FastTSAM", "tsam_oracle"]


class TSAMConfig:
    """The hyperparameters every method shares (those of ``TSAM(sampler="ascent", start="gaussian")``)."""

    def __init__(self, base_optimizer=torch.optim.SGD, base_kwargs: Optional[dict] = None, tilt: float = 1.0,
                 num_samples: int = 3, rho: float = 0.05, radius: float = 1.0, noise_scale: float = 1.0,
                 seed: int = 0):
        self.base_optimizer = base_optimizer
        self.base_kwargs = dict(base_kwargs or dict(lr=0.01, momentum=0.9))
        self.tilt = float(tilt)
        self.num_samples = int(num_samples)
        self.rho = float(rho)
        self.radius = float(radius)
        self.noise_scale = float(noise_scale)
        self.seed = int(seed)

    def as_dict(self) -> dict:
        return dict(base_optimizer=self.base_optimizer.__name__, base_kwargs=self.base_kwargs, tilt=self.tilt,
                    num_samples=self.num_samples, rho=self.rho, radius=self.radius,
                    noise_scale=self.noise_scale, seed=self.seed, sampler="ascent", start="gaussian")


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# -- noise --------------------------------------------------------------------------------------


class NoiseSource:
    """Standard normal noise for parameter ``index`` of sample ``j`` of step ``step``."""

    name = ""

    def bind(self, params: List[torch.Tensor]) -> None:
        """Called once with the method's parameters (in the optimizer's order)."""

    def fill_(self, out: torch.Tensor, index: int, step: int, j: int) -> torch.Tensor:
        raise NotImplementedError

    def like(self, p: torch.Tensor, index: int, step: int, j: int) -> torch.Tensor:
        return self.fill_(torch.empty_like(p, memory_format=torch.contiguous_format), index, step, j)


class PhiloxNoise(NoiseSource):
    """tsam_fast's counter-based noise: parameter ``index`` covers global elements ``offset[index] + k``."""

    name = "philox"

    def __init__(self, seed: int):
        self.seed = seed
        self.offsets: List[int] = []

    def bind(self, params):
        self.offsets = [0]
        for p in params[:-1]:
            self.offsets.append(self.offsets[-1] + p.numel())

    def fill_(self, out, index, step, j):
        flat = out.view(-1)  # out is contiguous (allocated by the caller or .grad of a dense parameter)
        rng.normal(rng.stream_seed(self.seed, step, j, rng.STREAM_START), self.offsets[index], flat.numel(), out=flat)
        return out


class TorchNoise(NoiseSource):
    """torch's default generator for the device (seeded once): what the published loop calls."""

    name = "torch"

    def __init__(self, seed: int):
        self.seed = seed
        self.generator: Optional[torch.Generator] = None

    def bind(self, params):
        self.generator = torch.Generator(device=params[0].device).manual_seed(self.seed)

    def fill_(self, out, index, step, j):
        return out.normal_(generator=self.generator)


# -- methods ------------------------------------------------------------------------------------


class ERM:
    """The base optimizer alone: one forward/backward per step."""

    calls_per_step = 1

    def __init__(self, params, cfg: TSAMConfig, noise: Optional[NoiseSource] = None):
        self.params = list(params)
        self.opt = cfg.base_optimizer(self.params, **cfg.base_kwargs)

    def step(self, closure) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        self.opt.step()
        return loss.detach()

    def held_bytes(self) -> int:
        return 0


class SAM:
    """SAM as most users run it (the authors' ``sam.py``, after Foret et al. and davda54/sam)."""

    calls_per_step = 2

    def __init__(self, params, cfg: TSAMConfig, noise: Optional[NoiseSource] = None):
        self.params = list(params)
        self.rho = cfg.rho
        self.opt = cfg.base_optimizer(self.params, **cfg.base_kwargs)
        self.old_p: Dict[torch.Tensor, torch.Tensor] = {}

    def step(self, closure) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            closure()
        with torch.no_grad():
            grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params if p.grad is not None]), p=2)
            scale = self.rho / (grad_norm + 1e-12)
            for p in self.params:
                if p.grad is None:
                    continue
                self.old_p[p] = p.data.clone()
                p.add_(p.grad * scale.to(p))
        self.opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss2 = closure()
        with torch.no_grad():
            for p in self.params:
                if p.grad is None:
                    continue
                p.data = self.old_p[p]  # back to theta; the perturbed storage is freed
        self.opt.step()
        return loss2.detach()

    def held_bytes(self) -> int:
        # old_p aliases the parameters after the step; during it, it was one full copy
        return _nbytes(p for p in self.params)


class _NoisyBaseline:
    """What the two TSAM baselines share: the base optimizer over the parameters, the noise source bound
    to their global offsets, 2 closure calls per sample (``ascent``) and the step counter of the noise."""

    def __init__(self, params, cfg: TSAMConfig, noise: NoiseSource):
        self.params = list(params)
        self.cfg = cfg
        self.noise = noise
        noise.bind(self.params)
        self.opt = cfg.base_optimizer(self.params, **cfg.base_kwargs)
        self.calls_per_step = 2 * cfg.num_samples
        self.step_count = 0


class AuthorsTSAM(_NoisyBaseline):
    """The published TSAM loop (``random1`` sampler, ``gaussian`` epsilon), kept faithful on purpose.

    Same math as ``TSAM(sampler="ascent", start="gaussian")``: noise ``scaling * xi`` clipped to norm
    ``r``, one normalized ascent step of length ``rho``, weights ``softmax(t * L)`` of the losses at
    the ascent points. The costs the paper's code pays are kept: a backup clone and a noise tensor per
    parameter per sample, a ``.item()`` per parameter for the noise norm and per sample for the loss,
    one gradient clone per parameter per sample, host-side weights, aggregation in Python loops.
    """

    def __init__(self, params, cfg: TSAMConfig, noise: NoiseSource):
        super().__init__(params, cfg, noise)
        self.state: Dict[torch.Tensor, dict] = {p: {} for p in self.params}
        self.track_memory = False  # the benchmark sets it for one untimed step: the bookkeeping costs time
        self._peak = 0

    def _first_step2(self, j: int):
        """theta <- theta + noise, noise = scaling * xi clipped to norm r (the authors' ``first_step2``)."""
        scaling, r = self.cfg.noise_scale, self.cfg.radius
        norm_noise = 0.0
        noise = {}
        for i, p in enumerate(self.params):
            self.state[p]["old_p"] = p.data.clone()
            noise[p] = scaling * self.noise.like(p, i, self.step_count, j)
            norm_noise += noise[p].norm(2).item() ** 2
        norm_noise = norm_noise ** 0.5
        clip_bound = min(norm_noise, r)
        for p in self.params:
            noise[p] = noise[p] * clip_bound / norm_noise
            p.add_(noise[p])
        return noise

    def _first_step3(self):
        """theta <- theta + rho * g / ||g|| (the authors' ``first_step3``)."""
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params if p.grad is not None]), p=2)
        scale = self.cfg.rho / (grad_norm + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            p.add_(p.grad * scale.to(p))

    def _set_old_theta(self):
        for p in self.params:
            if p.grad is None:
                continue
            p.data = self.state[p]["old_p"]

    def _tilted_aggregation(self, losses: List[float], grads: List[Dict[int, torch.Tensor]]):
        losses = torch.FloatTensor(losses)
        max_loss = torch.max(losses)
        t = self.cfg.tilt
        weights = torch.exp(t * (losses - max_loss)) / torch.sum(torch.exp(t * (losses - max_loss)))
        tmp_grad = {}
        for i, p in enumerate(self.params):
            tmp_grad[i] = torch.zeros_like(p)
        for i, p in enumerate(self.params):
            for k, grad in enumerate(grads):
                tmp_grad[i].add_(grad[i] * weights[k])
            p.grad = tmp_grad[i]

    def step(self, closure) -> torch.Tensor:
        grads, losses = [], []
        for j in range(self.cfg.num_samples):
            with torch.no_grad():
                noise = self._first_step2(j)
            self._note(self.state.values(), noise.values(), grads)
            self.opt.zero_grad()
            with torch.enable_grad():
                closure()
            with torch.no_grad():
                self._first_step3()
            self.opt.zero_grad()
            with torch.enable_grad():
                loss2 = closure()
            with torch.no_grad():
                self._set_old_theta()
                grads.append({i: p.grad.clone() for i, p in enumerate(self.params)})
            losses.append(loss2.mean().item())
            self.opt.zero_grad()
        self._note(noise.values(), grads)
        with torch.no_grad():
            self._tilted_aggregation(losses, grads)
            self.opt.step()
        self.step_count += 1
        t, s = self.cfg.tilt, self.cfg.num_samples
        lt = torch.tensor(losses, dtype=torch.float64)
        return ((torch.logsumexp(t * lt, 0) - math.log(s)) / t if t > 0 else lt.mean()).float()

    def _note(self, *collections) -> None:
        """Track the peak of the extra tensors alive at this point (old_p only while it is a copy)."""
        if not self.track_memory:
            return
        live = {}
        for c in collections:
            for item in c:
                for t in (item.values() if isinstance(item, dict) else [item]):
                    live[t.data_ptr()] = t.numel() * t.element_size()
        for p in self.params:
            live.pop(p.data_ptr(), None)
        self._peak = max(self._peak, sum(live.values()))

    def held_bytes(self) -> int:
        return self._peak


class ForeachTSAM(_NoisyBaseline):
    """TSAM in plain PyTorch at its best: foreach ops, device scalars, one streaming accumulator.

    The accumulator is kept normalized, ``A = sum_j w_j g_j`` under the weights seen so far, so each
    sample folds in with one ``lerp``: with ``Z' = a Z + e`` (``a = exp(m - m')``, ``e = exp(tL - m')``)
    the new weight of ``g`` is ``e / Z'`` and ``A <- lerp(A, g, e / Z')`` (docs/design.md §2's streaming
    form divided by Z). The gradient buffers are idle between the tilt update and the next closure,
    so the random start's noise is drawn into them.
    """

    def __init__(self, params, cfg: TSAMConfig, noise: NoiseSource):
        super().__init__(params, cfg, noise)
        for p in self.params:
            p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
        self.grads = [p.grad for p in self.params]
        self.theta0 = [torch.empty_like(p) for p in self.params]
        self.acc = [torch.empty_like(p, dtype=torch.float32) for p in self.params]

    def _call(self, closure) -> torch.Tensor:
        torch._foreach_zero_(self.grads)
        with torch.enable_grad():
            loss = closure().detach()
        # backward accumulates into the existing .grad in place; re-read in case a closure replaced one
        self.grads = [p.grad for p in self.params]
        return loss

    def _random_start(self, j: int) -> None:
        """theta <- theta0 + min(scale, r / ||xi||) * xi, xi drawn into the gradient buffers."""
        for i, g in enumerate(self.grads):
            self.noise.fill_(g, i, self.step_count, j)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.grads)))
        coef = torch.clamp_max(self.cfg.radius / norm.clamp_min(1e-30), self.cfg.noise_scale)
        torch._foreach_mul_(self.grads, coef)
        torch._foreach_copy_(self.params, self.theta0)
        torch._foreach_add_(self.params, self.grads)

    @torch.no_grad()
    def step(self, closure) -> torch.Tensor:
        t, s, n = self.cfg.tilt, self.cfg.num_samples, len(self.params)
        torch._foreach_copy_(self.theta0, self.params)
        losses = []
        m = z = None
        for j in range(s):
            self._random_start(j)
            self._call(closure)
            scale = self.cfg.rho / (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.grads))) + 1e-12)
            torch._foreach_mul_(self.grads, scale)  # the gradient is not needed after the ascent step
            torch._foreach_add_(self.params, self.grads)
            loss = self._call(closure)
            losses.append(loss)
            x = (loss * t).float()
            if j == 0:
                m, z = x, torch.ones_like(x)
                if s > 1:
                    torch._foreach_copy_(self.acc, self.grads)
                continue
            m_new = torch.maximum(m, x)
            e = torch.exp(x - m_new)
            z = z * torch.exp(m - m_new) + e
            m = m_new
            w = e / z
            if j + 1 < s:
                torch._foreach_lerp_(self.acc, self.grads, [w] * n)
            else:  # the last sample writes the tilted gradient straight into .grad: (1-w) A + w g
                torch._foreach_lerp_(self.grads, self.acc, [1 - w] * n)
        torch._foreach_copy_(self.params, self.theta0)
        self.opt.step()
        self.step_count += 1
        lt = torch.stack(losses).float()
        return (torch.logsumexp(t * lt, 0) - math.log(s)) / t if t > 0 else lt.mean()

    def held_bytes(self) -> int:
        return _nbytes(self.theta0) + _nbytes(self.acc)


class FastTSAM:
    """``tsam_fast.TSAM`` with one backend (a name, or a ``Backend`` object); noise is the package's own
    (``noise`` is ignored)."""

    def __init__(self, params, cfg: TSAMConfig, noise: Optional[NoiseSource] = None, *,
                 backend: Union[str, Backend] = "auto", check_finite: bool = False):
        self.opt = tsam_oracle(params, cfg, backend=backend, check_finite=check_finite)
        self.calls_per_step = 2 * cfg.num_samples

    def step(self, closure) -> torch.Tensor:
        return self.opt.step(closure)

    def held_bytes(self) -> int:
        return self.opt.extra_memory_bytes()


def tsam_oracle(params, cfg: TSAMConfig, *, num_samples: Optional[int] = None, sampler: str = "ascent",
                start: str = "gaussian", backend: Union[str, Backend] = "reference",
                check_finite: bool = False) -> TSAM:
    """``tsam_fast.TSAM`` with the benchmark's hyperparameters; the oracle of every method's check.

    ERM is TSAM(sampler="random", start="none", num_samples=1) and SAM is TSAM(sampler="ascent",
    start="none", num_samples=1), so one reference optimizer checks every row.
    """
    return TSAM(params, cfg.base_optimizer, tilt=cfg.tilt,
                num_samples=cfg.num_samples if num_samples is None else num_samples, sampler=sampler,
                start=start, radius=cfg.radius, noise_scale=cfg.noise_scale, rho=cfg.rho, seed=cfg.seed,
                backend=backend, check_finite=check_finite, **cfg.base_kwargs)

