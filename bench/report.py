"""The throughput benchmark's output: the markdown tables, the one-line verdict per tsam_fast row, and the
files (JSON, markdown, PNG and a pointer to the newest JSON, written by ``harness.save``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List

import harness
from harness import model_tag

def _sig(x: float, digits: int = 2) -> str:
    """``x`` to ``digits`` significant digits (at least), never in exponent form: 1.7, 2.0, 0.96, 84.4, 1234."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def _steps_cell(row: dict) -> str:
    """The timed steps of a row, and what cut them: the time budget (marked) or the row budget."""
    n, planned = row["steps"], row.get("steps_planned", row["steps"])
    if row.get("cut_short"):
        return f"{n} of {planned} (time budget)"
    if row.get("row_budget_capped"):
        return f"{n} (row budget)"
    return str(n)


def _note_cell(row: dict) -> str:
    why = row.get("unreliable") or []
    return "**unreliable**: " + "; ".join(why) if why else ""


#: the rows each tsam_fast row is compared with in the verdict, and how the verdict names them
VERDICT_BASELINES = (("tsam_foreach", "plain foreach TSAM"), ("tsam_authors", "the authors' loop"))


def verdict(record: dict) -> List[str]:
    """One line per tsam_fast row (a backend, or its ``begin_step()`` loop): its optimizer overhead per step on
    the largest model it ran, as a multiple of the bandwidth floor and against plain foreach TSAM and the
    authors'-style loop on that model (or on the largest model both ran, then named). A baseline that did not
    run is said to be missing; a figure read from a row marked unreliable is marked ``[unreliable]``."""
    dev = record["device"]["type"]
    models = record["models"]
    keys = list(dict.fromkeys(k for m in models for k in m["methods"] if k.startswith("tsam_fast_")))
    if not keys:
        ran = ", ".join(dict.fromkeys(k for m in models for k in m["methods"])) or "none"
        return [f"verdict ({dev}): no tsam_fast row ran (rows: {ran}): nothing to compare"]

    def flag(*rows) -> str:
        return " [unreliable]" if any(not r.get("reliable", True) for r in rows) else ""

    out = []
    for key in keys:
        ran = [m for m in models if key in m["methods"]]
        big = max(ran, key=lambda m: m["params"])
        row = big["methods"][key]
        parts = [f"overhead {_sig(row['overhead_ms'], 3)} ms = {_sig(row['overhead_over_floor'])}× the floor"
                 + flag(row)]
        for base, what in VERDICT_BASELINES:
            both = [m for m in ran if base in m["methods"]]
            if not both:
                parts.append(f"no row of {what} in this run")
                continue
            m = big if big in both else max(both, key=lambda m: m["params"])
            mine, theirs = m["methods"][key], m["methods"][base]
            where = "" if m is big else f" (on {model_tag(m['kind'], m['params'])})"
            if mine["overhead_ms"] <= 0 or theirs["overhead_ms"] <= 0:
                parts.append(f"no ratio to {what}{where}: an overhead ≤ 0")
                continue
            ratio = theirs["overhead_ms"] / mine["overhead_ms"]
            parts.append((f"{_sig(ratio)}× below " if ratio >= 1 else f"{_sig(1 / ratio)}× above ")
                         + what + where + flag(mine, theirs))
        out.append(f"verdict ({dev}, {model_tag(big['kind'], big['params'])}): "
                   f"{row['label']}: " + ", ".join(parts))
    return out


def markdown(record: dict) -> str:
    """The run as markdown: a header line, a table per model, what the columns mean, the verdict last."""
    dev = record["device"]
    cfg = record["config"]
    lines = [f"{record['mode']} mode — {dev['name']} ({dev['type']}"
             + (f", {dev['cores']} cores, {dev['torch_threads']} torch threads)" if dev["type"] == "cpu" else ")")
             + f"; torch {record['versions']['torch']}; copy bandwidth {record['bandwidth_gbps']:.1f} GB/s; "
             f"s = {cfg['tsam']['num_samples']}, base optimizer {cfg['tsam']['base_optimizer']}; reference "
             f"generator: {record['backends']['reference']['generator']}"
             + (f"; load average {record['load_average']['before']:.1f} before, "
                f"{record['load_average']['after']:.1f} after" if record["load_average"]["before"] is not None else "")
             + (f"; wall time {record['wall_s']:.0f} s of a {cfg['time_budget_s']:.0f} s time budget"
                if "wall_s" in record else ""),
             ""]
    gpu = dev["type"] == "cuda"
    head = ["method", "calls", "steps", "step ms (median [IQR])", "fwd+bwd ms", "overhead ms (median [IQR])",
            "overhead ÷ floor", "÷ foreach", "extra mem ×params"] + (["peak step alloc ×params"] if gpu else []) + [
        "samples/s", "tokens/s", "note"]
    for m in record["models"]:
        check = m.get("check") or {}
        errs = [c["update_rel_err"] for cs in check.values() for c in cs.values()]
        phases = "; ".join(f"{name} {m[k]:.0f} s" for name, k in (("check", "check_s"), ("warm-up", "warmup_s"),
                                                                   ("timing", "timing_s")) if k in m)
        lines.append(f"**{m['name']}**: {harness.fmt_count(m['params'])} parameters in {m['tensors']} tensors; "
                     f"forward+backward {m['fwd_bwd_ms']['median']:.2f} ms; bandwidth floor {m['floor_ms']:.3f} ms "
                     f"({m['floor_bytes'] / 1e6:.0f} MB per TSAM step)"
                     + (f"; largest check error {max(errs):.1e} (tolerance {cfg['check_rtol']:g})" if errs
                        else "; NOT CHECKED")
                     + (f"; {phases}" if phases else "")
                     + (f"; warm-up cut to {m['warmup_rounds']} of {cfg['warmup']} rounds by the time budget"
                        if m.get("warmup_rounds", cfg["warmup"]) < cfg["warmup"] else ""))
        lines.append("")
        foreach = m["methods"].get("tsam_foreach")
        rows = []
        for key, r in m["methods"].items():
            st, ov = r["step_ms"], r["overhead"]
            cells = [r["label"], str(r["calls"]), _steps_cell(r),
                     f"{st['median']:.2f} [{st['q25']:.2f}–{st['q75']:.2f}]", f"{r['fwd_bwd_ms']:.2f}",
                     f"{ov['median']:.2f} [{ov['q25']:.2f}–{ov['q75']:.2f}]",
                     f"{r['overhead_over_floor']:.2f}",
                     f"{r['overhead_ms'] / foreach['overhead_ms']:.2f}" if foreach and key != "erm" and key != "sam"
                     else "–", f"{r['extra_memory_x']:.2f}"]
            if gpu:
                cells.append(f"{r.get('peak_step_alloc_x', float('nan')):.2f}")
            cells += [f"{r['samples_per_s']:.0f}", f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "–",
                      _note_cell(r)]
            rows.append(cells)
        lines.append(harness.markdown_table(head, rows))
        lines.append("")
    lines.append("overhead = step − time inside the closure (CPU: measured inside each step; GPU: calls × the "
                 "forward/backward row's median); floor = docs/design.md §5 bytes ÷ the copy bandwidth measured in "
                 "this run; ÷ foreach = overhead ÷ the plain foreach TSAM's; extra mem = tensors the method holds "
                 "beyond parameters, gradients and base-optimizer state. steps: timed steps of the row; \"of N (time "
                 "budget)\": cut short when the run's time budget (checks, warm-ups, timing) ran out; \"(row "
                 "budget)\": a slow row held to about --row-budget seconds. **unreliable**: "
                 f"{harness.UNRELIABLE_RULE} (step or overhead): do not read its ratios. Baselines timed with "
                 f"{cfg['baseline_noise']} noise; every row matched the reference before timing"
                 + (" (checks skipped: --no-check)." if cfg.get("no_check") else "."))
    lines.append("")
    lines.append("\n\n".join(verdict(record)))
    return "\n".join(lines)


def save(record: dict, out_dir: Path, make_plot: bool, pointer: bool = True) -> List[Path]:
    """The record's JSON, markdown and PNG in ``out_dir``; with ``pointer``, ``latest-<mode>-<device>.txt``
    naming the newest JSON (not in the committed ``bench/results/``, where it would change with every run)."""
    dev = record["device"]["type"]
    stem = f"{record['mode']}-{dev}-{record['config']['size']}"
    return harness.save(record, out_dir, stem, markdown=markdown(record),
                        plot=harness.plot_overheads if make_plot else None,
                        pointer=f"latest-{record['mode']}-{dev}.txt" if pointer else None)
