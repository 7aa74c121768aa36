"""The benchmarks' one harness: timer, copy bandwidth, the bandwidth floor, summary statistics, progress,
the machine record and the output writers. Plain functions and classes, so that any benchmark script
(``throughput.py``'s modes, ``bench_ops.py``, a separate script) is a few dozen lines of what it measures:

    from harness import Timer, copy_bandwidth, floor_ms, summarize, machine_record, results_dir, save

    timer = Timer(device)
    times = timer.repeat(lambda: opt.step(closure), warmup=2, steps=10)   # ms; CUDA events on a GPU
    gbps = copy_bandwidth(device)
    row = dict(step_ms=summarize(times), floor_ms=floor_ms(d, s, gbps))
    record = dict(machine_record(device), rows=[row])
    save(record, results_dir(), "mybench-cpu", markdown="| ... |")   # <stem>-<UTC stamp>.json/.md/.png

The floor is stated once, here (docs/design.md §5), and so is when a median is too noisy to read
(``unreliable``). Results go outside the checkout by default (``results_dir``): a run never dirties the
repository; committed results (``bench/results/``) are written only when a script is asked to.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

import tsam_fast

# -- the bandwidth floor (docs/design.md §5) -----------------------------------------------------------

#: passes over d elements of 4 bytes per sample of a TSAM step (``ascent``, SGD with momentum):
#: ||g0||^2 (1); theta += k*g0 (3); tilt update fused with the next start (5); zeroing before 2 backwards (2)
PASSES_PER_SAMPLE = 11
#: per step: backup fused with the first start (3); the final gradient write (1); SGD with momentum (5)
PASSES_PER_STEP = 9


def floor_bytes(numel: int, num_samples: int, elem_bytes: int = 4) -> int:
    """Minimum memory traffic of one TSAM step over ``numel`` parameters: ``(11 s + 9) * 4 d`` bytes (42
    passes for s = 3). Noise is generated, not read; forward and backward are the model's, not counted."""
    return (PASSES_PER_SAMPLE * num_samples + PASSES_PER_STEP) * numel * elem_bytes


def floor_ms(numel: int, num_samples: int, gbps: float) -> float:
    """The floor in ms at ``gbps`` (read + write counted): the time no implementation can beat."""
    return floor_bytes(numel, num_samples) / (gbps * 1e9) * 1e3


# -- timing -------------------------------------------------------------------------------------------


class Timer:
    """Wall time of a callable in ms: ``perf_counter`` on the CPU; CUDA events on a GPU, read at ``flush``
    (one sync for many steps, none inside a timed region)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._pending = []

    def time(self, fn: Callable[[], object], sink: List[float]) -> None:
        """Run ``fn``; its time in ms lands in ``sink`` now (CPU) or at the next ``flush`` (GPU)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self._pending.append((start, end, sink))
        else:
            t0 = time.perf_counter()
            fn()
            sink.append((time.perf_counter() - t0) * 1e3)

    def flush(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            for start, end, sink in self._pending:
                sink.append(start.elapsed_time(end))
            self._pending = []

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def repeat(self, fn: Callable[[], object], warmup: int, steps: int) -> List[float]:
        """``warmup`` untimed calls, then ``steps`` timed ones (ms)."""
        for _ in range(warmup):
            fn()
        self.sync()
        out: List[float] = []
        for _ in range(steps):
            self.time(fn, out)
        self.flush()
        return out


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, repeats: int = 10) -> float:
    """Copy bandwidth in GB/s (read + write counted): median of ``repeats`` copies of ``nbytes`` (default
    256 MiB on a CPU, 1 GiB on CUDA: beyond the caches)."""
    device = torch.device(device)
    nbytes = nbytes or (1024 if device.type == "cuda" else 256) * 2**20
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of the pages, outside the timing
    times = Timer(device).repeat(lambda: dst.copy_(src), 1, repeats)
    return 2 * src.numel() * 4 / (statistics.median(times) * 1e-3) / 1e9


def summarize(ms: Sequence[float]) -> dict:
    """Median, quartiles, IQR, min, mean and count of a list of times."""
    ms = list(ms)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return dict(median=statistics.median(ms), q25=q[0], q75=q[2], iqr=q[2] - q[0], min=min(ms),
                mean=statistics.fmean(ms), n=len(ms))


# -- when a median cannot be read ---------------------------------------------------------------------

#: A median is unreliable when its ~95% confidence interval is wider than ±15% of it. The ratio of two
#: rows (÷ foreach, the verdict's "1.8× below") is then uncertain by about ±20% (√2 × 15%): "1.7×" could
#: be 1.4× or 2.0×, the most a one-decimal verdict can carry.
RELIABLE_HALF_WIDTH = 0.15
#: Fewer samples than this have no quartiles worth the name.
MIN_SAMPLES = 3
#: the rule in words, for the footnotes of the tables
UNRELIABLE_RULE = (f"the median's 95% interval (about ± 2 IQR/√n over n samples) is wider than "
                   f"±{100 * RELIABLE_HALF_WIDTH:.0f}%, or there are fewer than {MIN_SAMPLES} samples")


def median_half_width(st: dict) -> float:
    """Half-width of the median's ~95% confidence interval, relative to the median: ``2 IQR / (√n median)``.

    The sample median's standard error is ``1 / (2 f(m) √n)``, ``f(m)`` the density at the median; taking
    ``f(m)`` as the mean density over the central half of the samples, ``0.5 / IQR``, gives ``IQR / √n``
    (a normal distribution's is 0.93 IQR/√n), and 1.96 of those is about 2. So the spread a row can
    carry grows with its samples: IQR/median up to 0.29 at 15 steps, 0.15 at 4, 0.53 at 50, 2.9 at 1500.
    Steps disturbed in bursts (a neighbour's job) are not independent: the interval is then optimistic,
    but the bursts widen the IQR itself. ``inf`` for a median ≤ 0 or fewer than 2 samples."""
    if st["n"] < 2 or st["median"] <= 0:
        return math.inf
    return 2.0 * st["iqr"] / (math.sqrt(st["n"]) * st["median"])


def unreliable(st: dict, what: str = "median") -> Optional[str]:
    """Why the median of summary ``st`` (``summarize``'s) cannot be read, or None when it can: fewer than
    ``MIN_SAMPLES`` samples, a median ≤ 0, or a 95% interval wider than ±``RELIABLE_HALF_WIDTH``."""
    if st["n"] < MIN_SAMPLES:
        return f"{what}: {st['n']} sample{'s' if st['n'] != 1 else ''} (under {MIN_SAMPLES})"
    if st["median"] <= 0:
        return f"{what}: median {st['median']:.3g} ≤ 0"
    half = median_half_width(st)
    if half > RELIABLE_HALF_WIDTH:
        return (f"{what} ±{100 * half:.0f}% (IQR {st['iqr'] / st['median']:.2f} of the median, "
                f"{st['n']} samples)")
    return None


class Progress:
    """Progress on stderr, whatever stderr is.

    On a terminal: a one-line bar (tqdm's when installed), its text the current phase. Otherwise (a log
    file, CI, ``nohup``): plain lines, flushed at once, each stamped with the seconds since the start:
    every ``note`` (a phase begins: a model's check, warm-up, timing) and the text of ``update`` (a row
    or a round done), the latter at most one per ``every_s`` seconds so that fast rows do not flood the
    log; a row slower than that always gets its line. ``warn`` lines (a budget ran out) show in both
    modes. ``enabled=False`` is silent. ``start`` (a ``time.perf_counter()`` value, default now) is the
    zero of the stamps."""

    def __init__(self, total: int, enabled: bool = True, every_s: float = 1.0, stream=None,
                 start: Optional[float] = None):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.text = max(total, 1), 0, ""
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        self.mode = "off" if not enabled else "bar" if tty else "lines"
        self.every_s = every_s
        self.t0 = time.perf_counter() if start is None else start
        self._bar = None
        self._last = -math.inf  # when the last bar redraw / throttled line was written
        if self.mode == "bar":
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=self.total, unit="step", file=self.stream, leave=False)
            except ImportError:
                pass

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def elapsed(self) -> float:
        """Seconds since this progress began."""
        return time.perf_counter() - self.t0

    def _line(self, text: str) -> None:
        self.stream.write(f"[{self.elapsed():6.1f} s] {text}\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A phase begins: a line in a log, the bar's text on a terminal."""
        self.text = text
        if self.mode == "lines":
            self._line(text)
            self._last = time.perf_counter()
        elif self.mode == "bar":
            self._draw(force=True)

    def warn(self, text: str) -> None:
        """Something the reader must know (a budget ran out): a line in both modes."""
        if self.mode == "lines":
            self._line(text)
            self._last = time.perf_counter()
        elif self.mode == "bar":
            if self._bar is not None:
                self._bar.write(text, file=self.stream)
            else:
                self.stream.write("\r" + " " * 100 + "\r" + text + "\n")
                self.stream.flush()
                self._draw(force=True)

    def update(self, n: int = 1, text: Optional[str] = None) -> None:
        """``n`` units done; ``text``, when given, says what (throttled to one line per ``every_s`` in a log)."""
        self.done = min(self.done + n, self.total)
        if text is not None:
            self.text = text
        if self.mode == "lines":
            if text is not None and time.perf_counter() - self._last >= self.every_s:
                self._line(text)
                self._last = time.perf_counter()
        elif self.mode == "bar":
            if self._bar is not None:
                self._bar.update(n)
            self._draw()

    def _draw(self, force: bool = False) -> None:
        if self._bar is not None:
            self._bar.set_description(self.text[:60], refresh=True)
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.2 and self.done < self.total:
            return
        self._last = now
        frac = self.done / self.total
        self.stream.write(f"\r[{'#' * int(30 * frac):<30}] {100 * frac:3.0f}% {self.text[:60]:<60}")
        self.stream.flush()

    def close(self) -> None:
        if self.mode != "bar":
            return
        if self._bar is not None:
            self._bar.close()
        else:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()


# -- the machine record -------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none): recorded so noisy runs can be spotted."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def versions(**extra: str) -> dict:
    """Python, torch, tsam_fast and triton versions (triton None when absent), plus ``extra``."""
    out = dict(python=platform.python_version(), torch=torch.__version__, tsam_fast=tsam_fast.__version__)
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return {**out, **extra}


def device_description(device: torch.device) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return dict(type="cuda", name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, host_cpu=cpu_name(), host_cores=os.cpu_count())
    return dict(type=device.type, name=cpu_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads())


def backends_record(device_type: str = "cpu") -> dict:
    """Each backend's availability and reason, and how the reference backend generates noise here."""
    from tsam_fast.backends import reference_fast
    out = {n: dict(available=s.available, devices=list(s.devices), reason=s.reason)
           for n, s in tsam_fast.backend_info().items()}
    out["reference"]["generator"] = reference_fast.generator_info(device_type)
    return out


#: what ``--device`` takes, in the help of every script that has it
DEVICE_HELP = "auto (cuda if available, else cpu), cpu, cuda or cuda:N"


def resolve_device(text: str) -> torch.device:
    """``--device``: ``auto`` is cuda when available, else cpu; cuda where CUDA is absent exits in words."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available in this torch build / on this machine")
    return device


def machine_record(device: torch.device) -> dict:
    """What every result file starts with: schema, UTC date, device, versions, backends, load average."""
    device = torch.device(device)
    return dict(schema=2, date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                device=device_description(device), versions=versions(), backends=backends_record(device.type),
                load_average=dict(before=load_average()))


def warn_if_loaded(device: torch.device) -> Optional[float]:
    """Warn on stderr when other processes compete for the CPU; returns the load average."""
    load = load_average()
    if torch.device(device).type == "cpu" and load is not None and load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores before the run: other processes "
              "compete for the CPU and the times will be noisy", file=sys.stderr)
    return load


# -- output -------------------------------------------------------------------------------------------

#: where the benchmarks write when not told: outside the checkout, so a run leaves ``git status`` clean
RESULTS_ENV = "TSAM_FAST_RESULTS"
#: the committed results: written only when a script is asked to (``--record``: ``add_output_options``)
RECORDED_DIR = Path(__file__).resolve().parent / "results"


def results_dir() -> Path:
    """The default output directory: ``$TSAM_FAST_RESULTS``, else ``~/.cache/tsam_fast/results``."""
    return Path(os.environ.get(RESULTS_ENV) or Path.home() / ".cache" / "tsam_fast" / "results")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the unset ones (None: the preset or the model decides, said in the help)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def add_output_options(group, files: str, pointer: Optional[str] = None) -> None:
    """``--out-dir DIR`` or ``--record`` (the committed ``bench/results/``), one or the other, on an argparse
    parser or group; ``files`` says what is written, ``pointer`` the pointer file a run leaves beside them
    (none in the committed folder). ``output_dir(args)`` then says where they go."""
    out = group.add_mutually_exclusive_group()
    out.add_argument("--out-dir", type=Path, default=None,
                     help=f"where {files} go" + (f", with {pointer}" if pointer else "")
                          + f" (default: ${RESULTS_ENV}, else ~/.cache/tsam_fast/results: outside the checkout)")
    where = "the committed bench/results/" + (" (no pointer file)" if pointer else "")
    out.add_argument("--record", action="store_true", help=f"write the results into {where}: for figures the docs cite")


def output_dir(args) -> Path:
    """Where ``add_output_options``' flags send the files: ``--record``, ``--out-dir``, else ``results_dir()``."""
    return RECORDED_DIR if args.record else args.out_dir or results_dir()


def stamp(record: dict) -> str:
    """``YYYYMMDDTHHMMSS`` of the record's date."""
    return record["date"].replace(":", "").replace("-", "")[:15]


def fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def model_tag(kind: str, params: int) -> str:
    """How progress lines and verdicts name a model: ``gpt 5.28M``."""
    return f"{kind} {fmt_count(params)}"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save(record: dict, out_dir: Path, stem: str, markdown: Optional[str] = None,
         plot: Optional[Callable[[dict, Path], bool]] = None, pointer: Optional[str] = None) -> List[Path]:
    """Write ``<stem>-<stamp>.json`` (and ``.md`` with ``markdown``, ``.png`` when ``plot`` draws one).

    Timestamped files only; with ``pointer``, ``<out_dir>/<pointer>`` is a one-line text file naming the
    newest JSON (a pointer, not a copy)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = f"{stem}-{stamp(record)}"
    written = [out_dir / f"{base}.json"]
    written[0].write_text(json.dumps(record, indent=1) + "\n")
    if markdown is not None:
        (out_dir / f"{base}.md").write_text(markdown + "\n")
        written.append(out_dir / f"{base}.md")
    if plot is not None and plot(record, out_dir / f"{base}.png"):
        written.append(out_dir / f"{base}.png")
    if pointer:
        (out_dir / pointer).write_text(f"{base}.json\n")
        written.append(out_dir / pointer)
    return written


def latest(out_dir: Path, pointer: str) -> Path:
    """The JSON a pointer file names."""
    out_dir = Path(out_dir)
    return out_dir / (out_dir / pointer).read_text().strip()


MARKERS = {"mlp": "o", "cnn": "s", "gpt": "^", "flat": "D", "tiny": "v"}
MARKER_GLYPHS = {"o": "●", "s": "■", "^": "▲", "D": "◆", "v": "▼"}


def plot_overheads(record: dict, path: Path) -> bool:
    """PNG: overhead and overhead ÷ floor against parameter count, one line or point per method, with the
    IQR as error bars; a hollow marker is a row marked unreliable. Only the models that ran appear."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    models = record.get("models", [])
    if not models:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = list(dict.fromkeys(k for m in models for k in m["methods"]))
    kinds = list(dict.fromkeys(m["kind"] for m in models))
    any_unreliable = False
    for n, key in enumerate(keys):
        label = next(m["methods"][key]["label"] for m in models if key in m["methods"])
        labelled = False
        for kind in kinds:
            marker = MARKERS.get(kind, "x")
            ran = sorted((m for m in models if m["kind"] == kind and key in m["methods"]
                          and m["methods"][key]["overhead_ms"] > 0), key=lambda m: m["params"])
            if not ran:
                continue
            for ax, scale in zip(axes, [lambda m: 1.0, lambda m: 1.0 / m["floor_ms"]]):
                x = [m["params"] for m in ran]
                y = [m["methods"][key]["overhead_ms"] * scale(m) for m in ran]
                # the IQR of the per-step overhead; a lower quartile ≤ 0 is clipped by the log axis
                lo = [y_ - m["methods"][key]["overhead"]["q25"] * scale(m) for y_, m in zip(y, ran)]
                hi = [m["methods"][key]["overhead"]["q75"] * scale(m) - y_ for y_, m in zip(y, ran)]
                ax.errorbar(x, y, yerr=[[max(v, 0.0) for v in lo], [max(v, 0.0) for v in hi]], marker=marker,
                            color=f"C{n % 10}", ls="-" if len(ran) > 1 else "none", capsize=3, lw=1,
                            label=label if ax is axes[0] and not labelled else None)
                bad = [(x_, y_) for x_, y_, m in zip(x, y, ran) if not m["methods"][key].get("reliable", True)]
                if bad:
                    any_unreliable = True
                    ax.plot([b[0] for b in bad], [b[1] for b in bad], marker=marker, ls="none", mfc="white",
                            mec=f"C{n % 10}", zorder=3)
            labelled = True
    for ax, title in zip(axes, ("optimizer overhead per step (ms), IQR bars", "overhead ÷ bandwidth floor")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    legend = "  ".join(f"{MARKER_GLYPHS.get(MARKERS.get(k, 'x'), 'x')} {k}" for k in kinds)
    if any_unreliable:
        legend += "\nhollow: unreliable (spread too wide)"
    axes[0].legend(fontsize=8, title=legend, title_fontsize=8)
    dev = record["device"]
    fig.suptitle(f"tsam_fast {record.get('mode', '')} — {dev['name']} ({dev['type']}), {record['date'][:10]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def load_json(path: Path) -> Dict:
    return json.loads(Path(path).read_text())
