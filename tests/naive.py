"""An independent, deliberately naive TSAM: per-parameter loops, s stored gradients, two-pass softmax.

It shares only the noise definition with the package (``tsam_fast.rng.normal`` at each parameter's
global offset; the generator itself is tested against known answers and Triton). Everything else --
the random-start geometry, the ascent and leapfrog steps, the weights, the restore -- is written
again from docs/design.md, so the package's streaming, flat-buffer implementation is checked against it.
"""

from __future__ import annotations

import math

import torch

from tsam_fast import rng


class NaiveTSAM:
    def __init__(self, param_groups, base_cls, *, tilt=1.0, num_samples=3, sampler="ascent", start="gaussian",
                 radius=1.0, noise_scale=1.0, rho=0.05, adaptive=False, max_grad_norm=None, delta=0.0,
                 hmc_steps=1, hmc_step_size=0.01, hmc_sigma=1.0, seed=0, shared_ascent=False, **base_kwargs):
        if isinstance(param_groups, (list, tuple)) and param_groups and isinstance(param_groups[0], dict):
            groups = [dict(g) for g in param_groups]
        else:
            groups = [{"params": list(param_groups)}]
        for g in groups:
            g["params"] = list(g["params"])
            g.setdefault("tilt", tilt)
            g.setdefault("rho", rho)
            g.setdefault("radius", radius)
        self.groups = groups
        self.base = base_cls(groups, **base_kwargs)
        self.s, self.sampler, self.start = num_samples, sampler, start
        self.noise_scale, self.adaptive, self.max_grad_norm, self.delta = noise_scale, adaptive, max_grad_norm, delta
        self.hmc_steps, self.hmc_step_size, self.hmc_sigma = hmc_steps, hmc_step_size, hmc_sigma
        self.seed, self.k = seed, 0
        self.shared_ascent = shared_ascent  # one ascent gradient at theta0 for every sample
        # global offsets over every parameter (frozen included), in group then parameter order
        self.offsets, off, seen = {}, 0, set()
        for g in groups:
            for p in g["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    self.offsets[id(p)] = off
                    off += p.numel()
        self.entries = [(gi, p) for gi, g in enumerate(groups) for p in g["params"] if p.requires_grad]
        self.calls = []  # parameter snapshots at every closure call of the last step

    def _noise(self, p, seed):
        """Noise in the parameter's memory order (tsam_fast keeps dense layouts such as channels_last)."""
        out = torch.empty_like(p, dtype=torch.float32)  # same strides as p when p is dense
        flat = out.as_strided((p.numel(),), (1,), out.storage_offset())
        return rng.normal(seed, self.offsets[id(p)], p.numel(), out=flat) is not None and out

    def _grads(self):
        return [p.grad.detach().float().clone() if p.grad is not None else torch.zeros(p.shape)
                for _, p in self.entries]

    def _call(self, closure):
        for _, p in self.entries:
            p.grad = None
        self.calls.append([p.detach().clone() for _, p in self.entries])
        with torch.enable_grad():
            loss = closure()
        return float(loss)

    def _ascent_step(self, g0, theta0):
        """rho_g g0 / ||T g0|| (times T^2 when adaptive, T = |theta0|)."""
        if self.adaptive:
            g0n = math.sqrt(sum(float(((t.double() * g) ** 2).sum()) for t, g in zip(theta0, g0)))
        else:
            g0n = math.sqrt(sum(float((g.double() ** 2).sum()) for g in g0))
        out = []
        for (gi, _), g, t0 in zip(self.entries, g0, theta0):
            e = self.groups[gi]["rho"] * g / (g0n + 1e-12)
            out.append(e * t0.float() ** 2 if self.adaptive else e)
        return out

    def step(self, closure):
        entries, k = self.entries, self.k
        theta0 = [p.detach().clone() for _, p in entries]
        d = sum(p.numel() for _, p in entries)
        self.calls = []
        grads, losses, got_grad = [], [], [False] * len(entries)
        with torch.no_grad():
            shared = None
            if self.shared_ascent:  # the ascent step from g0 = grad L(theta0), added to every start
                self._call(closure)
                g0 = self._grads()
                shared = self._ascent_step(g0, theta0)
            for j in range(self.s):
                seed = rng.stream_seed(self.seed, k, j, rng.STREAM_START)
                xi = [self._noise(p, seed) for _, p in entries]
                norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in xi))
                for (gi, p), x, t0 in zip(entries, xi, theta0):
                    r = self.groups[gi]["radius"]
                    if self.start == "gaussian":
                        n = self.noise_scale * x
                        nn = self.noise_scale * norm
                        eps = n * min(1.0, r / nn) if nn > 0 else n
                    elif self.start == "sphere":
                        eps = r * x / norm
                    elif self.start == "ball":
                        u = rng.host_uniform(rng.stream_seed(self.seed, k, j, rng.STREAM_RADIUS))
                        eps = r * u ** (1.0 / d) * x / norm
                    else:
                        eps = torch.zeros_like(x)
                    p.copy_(t0.float() + eps)
                if shared is not None:
                    for (_, p), e in zip(entries, shared):
                        p.copy_(p.float() + e)
                elif self.sampler == "ascent":
                    self._call(closure)
                    for (_, p), e in zip(entries, self._ascent_step(self._grads(), theta0)):
                        p.copy_(p.float() + e)
                elif self.sampler == "hmc":
                    mseed = rng.stream_seed(self.seed, k, j, rng.STREAM_MOMENTUM)
                    v = [self.hmc_sigma * self._noise(p, mseed) for _, p in entries]
                    a = self.hmc_step_size
                    for step in range(self.hmc_steps):
                        self._call(closure)
                        g = self._grads()
                        for i, (_, p) in enumerate(entries):
                            v[i] = v[i] + (a / 2 if step == 0 else a) * g[i]
                            p.copy_(p.float() + a * v[i])
                loss = self._call(closure)
                for i, (_, p) in enumerate(entries):
                    got_grad[i] |= p.grad is not None
                g = self._grads()
                if self.max_grad_norm is not None:
                    gn = math.sqrt(sum(float((x.double() ** 2).sum()) for x in g))
                    c = min(1.0, self.max_grad_norm / (gn + 1e-6))
                    g = [x * c for x in g]
                grads.append(g)
                losses.append(loss)
            # two-pass softmax per parameter group
            for i, ((gi, p), t0) in enumerate(zip(entries, theta0)):
                t = self.groups[gi]["tilt"]
                t = t(k) if callable(t) else t
                x = [(t - self.delta) * L for L in losses]
                mx = max(x)
                w = [math.exp(v - mx) for v in x]
                z = sum(w)
                p.copy_(t0)
                if got_grad[i]:
                    p.grad = sum(wj / z * gj[i] for wj, gj in zip(w, grads)).to(p.dtype)
                else:
                    p.grad = None
        self.base.step()
        self.k += 1
        self.last_losses = losses
        return losses
