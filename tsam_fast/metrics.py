"""Sharpness of a trained model: how much the loss rises under random weight perturbations.

    from tsam_fast.metrics import sharpness
    s = sharpness(model, torch.nn.functional.cross_entropy, loader, eps=0.05, n=20, seed=0)
    s.mean, s.max, s.std, s.base_loss

The estimate is the *average-case* ("random direction") sharpness of Keskar et al. and Jiang et al.
("Fantastic generalization measures", 2020), in its adaptive form (Kwon et al., 2021; Andriushchenko
et al., 2023): the noise on each weight is proportional to the weight's own magnitude, which makes the
number invariant to the rescalings a ReLU network can absorb (one layer times c, the next divided by c).
It evaluates the model only; it does not touch the optimizer.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["Sharpness", "sharpness"]


@dataclass(frozen=True)
class Sharpness:
    """The result of :func:`sharpness` (plain Python floats).

    Attributes:
        mean: mean over the n perturbations of ``L(w + delta_i) - L(w)``.
        max: the largest of those increases (the worst sampled direction).
        std: their standard deviation (Bessel-corrected, n - 1 in the denominator; 0.0 when n = 1).
        base_loss: ``L(w)``, the unperturbed loss over ``data``.
        n: number of perturbations.
        eps: the perturbation scale.
        relative: whether the noise was scaled by ``|w|`` (see :func:`sharpness`).
        increases: the n increases, in the order they were drawn.
    """

    mean: float
    max: float
    std: float
    base_loss: float
    n: int
    eps: float
    relative: bool
    increases: Tuple[float, ...]


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"invalid eps={eps!r}: expected a finite number > 0")
    return float(eps)


def _check_int(name: str, value, low: Optional[int]) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise ValueError(f"invalid {name}={value!r}: expected an integer{bound}")
    return int(value)


def _batches(data) -> Iterable:
    """``data`` re-iterable: a DataLoader or list is iterated once per evaluation; a one-shot iterator
    (generator, ``iter(loader)``) is read once into a list so every evaluation sees the same batches."""
    if isinstance(data, torch.Tensor):
        raise ValueError("data must be an iterable of (x, y) batches, not a tensor; "
                         "for a single batch pass [(x, y)]")
    try:
        it = iter(data)
    except TypeError:
        raise ValueError(f"data must be an iterable of (x, y) batches (got {type(data).__name__})") from None
    return list(it) if it is data else data


def _batch_size(x, y) -> int:
    for value in (y, x):
        if isinstance(value, torch.Tensor):
            return value.shape[0] if value.dim() > 0 else 1
    return len(y)


def _loss_over(model: nn.Module, loss_fn: Callable, data, device: torch.device) -> torch.Tensor:
    """Size-weighted mean of ``loss_fn(model(x), y)`` over the batches, as a 0-dim fp64 device tensor
    (fp32 on MPS, which has no fp64). It stays on the device: ``sharpness`` reads all the losses at once."""
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    total = torch.zeros((), dtype=acc_dtype, device=device)
    count = 0
    for index, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            kind = type(batch).__name__ if not isinstance(batch, (tuple, list)) else f"{len(batch)}-tuple"
            raise ValueError(f"batch {index} of data is a {kind}: expected an (x, y) pair; "
                             "for a single batch pass [(x, y)]")
        x, y = batch
        if isinstance(x, torch.Tensor):
            x = x.to(device)
        if isinstance(y, torch.Tensor):
            y = y.to(device)
        size = _batch_size(x, y)
        if size == 0:
            continue
        loss = loss_fn(model(x), y)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor (the batch mean, e.g. "
                             f"torch.nn.functional.cross_entropy); got {type(loss).__name__}"
                             + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
        total = total + loss.detach().reshape(()).to(device=device, dtype=acc_dtype) * size
        count += size
    if count == 0:
        raise ValueError("data is empty: it yielded no (x, y) batch with at least one example")
    return total / count


@torch.no_grad()
def sharpness(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], data, *,
              eps: float = 0.05, n: int = 10, seed: int = 0, relative: bool = True,
              params: Optional[Sequence[torch.Tensor]] = None,
              device: Union[str, torch.device, None] = None) -> Sharpness:
    r"""Average and worst loss increase under n random Gaussian weight perturbations.

    For each i = 1..n, with :math:`\xi_i \sim N(0, I)` drawn element-wise for every perturbed weight:

    .. math::
        \delta_i = \varepsilon\,|w| \odot \xi_i \quad(\text{relative=True}), \qquad
        \delta_i = \varepsilon\,\xi_i \quad(\text{relative=False})

        \Delta_i = L(w + \delta_i) - L(w), \qquad
        \text{mean} = \tfrac1n \textstyle\sum_i \Delta_i, \quad \text{max} = \max_i \Delta_i

    with :math:`L(w)` the size-weighted mean of ``loss_fn(model(x), y)`` over the batches of
    ``data``. ``relative=True`` scales each element's noise by its own magnitude (so a weight that is
    exactly 0, e.g. a zero-initialized bias, is not perturbed): the total perturbation has norm about
    ``eps * ||w||``, and the measure is invariant to per-layer rescalings of a ReLU network.

    Args:
        model: evaluated in eval mode (``model.eval()``) under ``torch.no_grad``; every submodule's
            train/eval flag is put back afterwards, so batch-norm running statistics and dropout are
            not affected.
        loss_fn: ``loss_fn(model(x), y) -> scalar tensor``, the batch mean (e.g.
            ``torch.nn.functional.cross_entropy``).
        data: an iterable of ``(x, y)`` batches, e.g. a DataLoader with ``shuffle=False`` and no random
            augmentation (it is iterated n + 1 times; the estimate assumes it yields the same examples
            each time). A one-shot iterator is read into a list first.
        eps: the perturbation scale, > 0.
        n: the number of perturbations, >= 1.
        seed: the noise comes from a CPU ``torch.Generator`` seeded with it, drawn in fp32 parameter by
            parameter, perturbation by perturbation, then moved to each parameter's device and dtype: the
            same seed gives the same perturbations on any device.
        params: the tensors to perturb (default: the model's parameters with ``requires_grad``, tied
            ones once).
        device: where the batches are moved (default: the device of the first parameter in ``params``).

    Returns:
        :class:`Sharpness` (mean, max, std, base_loss, n, eps, relative, increases). A non-finite loss
        is reported as such (inf/nan), not raised.

    An evaluation to run between training steps (not inside a TSAM closure): it reads the results on
    the host once, at the end (one device sync per call).

    Every perturbed tensor is put back bit-for-bit from a saved copy when the function returns or
    raises (e.g. when ``loss_fn`` fails mid-way); the parameters are written in place, so views into
    them (such as :class:`tsam_fast.TSAM`'s flat buffers) stay attached.
    """
    eps = _check_eps(eps)
    n = _check_int("n", n, 1)
    seed = _check_int("seed", seed, None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (got {type(model).__name__})")
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list({id(p): p for p in params}.values())
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"params must be tensors (got {type(p).__name__})")
    params = [p for p in params if p.is_floating_point()]
    if not params:
        raise ValueError("sharpness: nothing to perturb (no floating-point parameter with requires_grad)")
    device = torch.device(device) if device is not None else params[0].device
    data = _batches(data)

    modes = [(m, m.training) for m in model.modules()]
    saved = [p.detach().clone() for p in params]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    try:
        model.eval()
        base = _loss_over(model, loss_fn, data, device)
        losses: List[torch.Tensor] = []
        for _ in range(n):
            for p, w0 in zip(params, saved):
                delta = torch.randn(w0.shape, generator=generator, dtype=torch.float32).to(w0.device)
                delta.mul_(eps)
                if relative:
                    delta.mul_(w0.abs())
                p.copy_(w0 + delta)  # from the saved copy each time (at least fp32 math): no drift
            losses.append(_loss_over(model, loss_fn, data, device))
    finally:
        for p, w0 in zip(params, saved):
            p.copy_(w0)
        for module, training in modes:
            module.training = training

    # the function's one device-to-host read: every loss in a single transfer (the loop above queues
    # device work only); everything below is host arithmetic on a CPU tensor
    values = torch.stack([base] + losses).to("cpu", torch.float64)
    base_loss = values[0].item()
    rises = values[1:] - base_loss
    return Sharpness(
        mean=rises.mean().item(),
        max=rises.max().item(),  # NaN-propagating, unlike Python's max
        std=rises.std().item() if n > 1 else 0.0,
        base_loss=base_loss,
        n=n,
        eps=eps,
        relative=bool(relative),
        increases=tuple(rises.tolist()),
    )
