"""The generalization study's data: the digits (``mnist.py``) or a synthetic stand-in, the stratified fit /
validation / test splits and the symmetric label noise (``generalization.py``'s docstring says how).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

import mnist

NUM_CLASSES = 10
SIDE = 28


@dataclass
class Split:
    x_train: torch.Tensor  # the fit set: what the models train on
    y_train: torch.Tensor  # clean
    x_val: torch.Tensor
    y_val: torch.Tensor  # clean (the runs use noisy copies, see noisy_labels)
    x_test: torch.Tensor
    y_test: torch.Tensor  # clean
    y_pool: torch.Tensor  # clean labels of fit + validation, in that order (one noise draw covers both)
    name: str = ""


def synthetic_digits(n: int = 400, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """A stand-in with MNIST's shape for the tests: 10 random 28x28 prototypes, each image its class's
    prototype plus uniform noise, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(NUM_CLASSES, SIDE * SIDE, generator=g) > 0.7).float()
    y = torch.arange(n) % NUM_CLASSES
    x = (0.6 * protos[y] + 0.4 * torch.rand(n, SIDE * SIDE, generator=g)).clamp(0, 1)
    return x, y


def stratified_split(y: torch.Tensor, fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (rest, held out): round(fraction * n_c) of every class c held out at random, both shuffled."""
    g = torch.Generator().manual_seed(seed)
    rest, held = [], []
    for c in range(int(y.max()) + 1):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(fraction * len(idx))
        held.append(idx[:k])
        rest.append(idx[k:])
    rest, held = torch.cat(rest), torch.cat(held)
    return rest[torch.randperm(len(rest), generator=g)], held[torch.randperm(len(held), generator=g)]


def load_split(data: str, test_size: float, val_size: float, split_seed: int, fit_size: Optional[int] = None) -> Split:
    """The digits (``mnist``) or the synthetic stand-in, split into fit / validation / test (see the module
    docstring); ``fit_size`` keeps that many of the fit examples (a random subset)."""
    if data == "mnist":
        try:
            x, y = mnist.load(sha1=mnist.SHA1)
        except mnist.MnistUnavailable as e:
            raise SystemExit(f"studies/generalization.py: {e}") from None
        name = f"MNIST digits (npm {mnist.PACKAGE}@{mnist.VERSION})"
    elif data == "synthetic":
        x, y = synthetic_digits()
        name = "synthetic 28x28 prototypes (tests only)"
    else:
        raise ValueError(f"unknown data {data!r}")
    train, test = stratified_split(y, test_size, split_seed)
    fit, val = stratified_split(y[train], val_size, split_seed + 1)
    fit, val = train[fit], train[val]
    if fit_size is not None:
        fit = fit[:fit_size]
    return Split(x[fit], y[fit], x[val], y[val], x[test], y[test], torch.cat([y[fit], y[val]]), name)


def symmetric_noise(y: torch.Tensor, p: float, seed: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """With probability p, replace each label by a uniformly random OTHER class: (y + U{1..C-1}) mod C."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=g) < p
    shift = torch.randint(1, num_classes, (len(y),), generator=g)
    return torch.where(flip, (y + shift) % num_classes, y)


def noise_seed(seed: int, p: float) -> int:
    return 1_000_003 * seed + round(1000 * p) + 17


def noisy_labels(split: Split, p: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The run's noisy (fit, validation) labels: one draw over fit + validation, then its two parts."""
    pool = symmetric_noise(split.y_pool, p, noise_seed(seed, p))
    return pool[:len(split.y_train)], pool[len(split.y_train):]
