"""The generalization study's report: per model and noise level, mean ± std over seeds and differences paired
by seed (with a paired t-test), the relative radius chosen on validation, the markdown tables, the plot and
the files (written by ``harness.save``).
"""

from __future__ import annotations

import math
import re
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import harness
from generalization_train import Method, tilt_key

# two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (paired tests over seeds)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    values = list(values)
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                n=len(values))


def paired(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """mean ± std of the per-seed differences a - b, and whether a two-sided paired t-test gives p < 0.05."""
    out = mean_std([x - y for x, y in zip(a, b)])
    n = out["n"]
    out["significant"] = bool(n > 1 and (out["std"] == 0 and out["mean"] != 0 or out["std"] > 0 and abs(
        out["mean"]) > (T95[n - 2] if n - 1 <= len(T95) else 1.96) * out["std"] / math.sqrt(n)))
    return out


def choose_radius(entries: List[dict]) -> Optional[dict]:
    """The relative-radius entry with the highest mean best-val VALIDATION accuracy (noisy labels) over
    seeds; ties -> the smaller radius. The test accuracy is not looked at."""
    if not entries:
        return None
    return max(entries, key=lambda e: (e["val_acc_selected"]["mean"], -e["radius"]))


def summarize(runs: List[dict], methods: List[Method]) -> dict:
    """Per model and noise level: one entry per method (mean ± std over seeds of every measure; paired
    differences to ERM, SAM and, for the relative radius, TSAM with the same t and the default radius),
    and per tilt the relative radius chosen on validation."""
    by = {(r["model"], r["method"], r["noise"], r["seed"]): r for r in runs}
    out: Dict[str, Dict[str, dict]] = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        out[model] = {}
        for p in sorted({r["noise"] for r in runs if r["model"] == model}):
            entries = []
            for m in methods:
                seeds = sorted(s for (mo, k, q, s) in by if mo == model and k == m.key and q == p)
                if not seeds:
                    continue
                rs = [by[(model, m.key, p, s)] for s in seeds]
                e = dict(method=m.key, label=m.label, kind=m.kind, table=m.table, tilt=m.tilt if m.kind == "tsam"
                         else None, radius=m.radius if m.kind == "tsam" else None,
                         radius_mode=m.radius_mode if m.kind == "tsam" else None, seeds=seeds,
                         epochs=rs[0]["epochs"], passes=rs[0]["passes"])
                for key in ("test_acc", "test_acc_selected", "val_acc_selected", "selected_epoch", "train_loss",
                            "train_acc_noisy", "param_norm", "train_s"):
                    e[key] = mean_std([r[key] for r in rs])
                e["sharpness"] = mean_std([r["sharpness"]["mean"] for r in rs])
                if m.kind != "erm":
                    for key in ("ess", "loss_range", "max_weight", "ess_last", "loss_range_last"):
                        e[key] = mean_std([r[key] for r in rs])
                refs = dict(erm="erm", sam="sam") if m.key != "erm" else {}
                if m.table in ("radius", "efficient", "efficient_wallclock"):
                    refs["abs"] = tilt_key(m.tilt)  # the paper's TSAM at the same t
                for name, ref in refs.items():
                    if ref == m.key or any((model, ref, p, s) not in by for s in seeds):
                        continue
                    for key in ("test_acc", "test_acc_selected"):
                        e[f"d_{name}_{key}"] = paired([by[(model, m.key, p, s)][key] for s in seeds],
                                                      [by[(model, ref, p, s)][key] for s in seeds])
                entries.append(e)
            chosen = {}
            for t in sorted({e["tilt"] for e in entries if e["table"] == "radius"}):
                pick = choose_radius([e for e in entries if e["table"] == "radius" and e["tilt"] == t])
                chosen[f"{t:g}"] = pick["method"]
            out[model][f"{p:g}"] = dict(noise=p, entries=entries, chosen_radius=chosen)
    return out


# -- markdown -----------------------------------------------------------------------------------


def _pm(stat: Optional[dict], scale: float = 100.0, digits: int = 1) -> str:
    if stat is None:
        return "—"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _delta(stat: Optional[dict], scale: float = 100.0, digits: int = 1) -> str:
    if stat is None:
        return "—"
    star = "*" if stat["significant"] else ""
    return f"{stat['mean'] * scale:+.{digits}f} ± {stat['std'] * scale:.{digits}f}{star}"


def _diag(e: dict) -> Tuple[str, str]:
    if "ess" not in e:
        return "—", "—"
    return (f"{e['ess']['mean']:.2f} ({e['ess_last']['mean']:.2f})",
            f"{e['loss_range']['mean']:.3f} ({e['loss_range_last']['mean']:.3f})")


def markdown(record: dict) -> str:
    cfg = record["config"]
    data = record["data"]
    lines = [f"## Generalization on {data['name']} ({data['train']} train / {data['val']} validation / {data['test']} "
             f"test), preset `{cfg['preset']}`, seeds {cfg['seeds']}", "",
             f"Hyperparameters (fixed before any run, identical for every method, no search): "
             f"{record['hyperparameter_budget']}", "",
             "Mean ± std over seeds. Test acc % final: after the last epoch; best-val: after the epoch with the "
             "highest accuracy on the NOISY validation labels (ties: earliest), the same rule for every method. "
             "Δ: test-accuracy difference in points, paired by seed (same init, noisy labels and batches), mean "
             "± std of the per-seed differences; * = two-sided paired t-test p < 0.05 (no multiplicity "
             "correction). ESS: effective sample size 1/Σw² of TSAM's weights per step, mean over the run (over "
             f"the last epoch); s = {cfg['num_samples']} means the tilt changes nothing. Loss range: max − min of "
             "the step's sample losses, same averages. Sharpness: mean loss rise under "
             f"{cfg['sharpness_n']} Gaussian weight perturbations of relative scale {cfg['sharpness_eps']:g} at "
             "the final weights, on the noisy training set. Time: training seconds per run (no evaluations).", ""]
    head = ("| method | epochs | test acc % final | best-val | Δ vs ERM final | Δ vs ERM best-val | "
            "Δ vs SAM final | Δ vs SAM best-val | best-val epoch | train acc (noisy) % | sharpness | ESS | "
            "loss range | time s |")
    for model, levels in record["summary"].items():
        cal = record["calibration"].get(model)
        for key, level in levels.items():
            p = level["noise"]
            entries = level["entries"]
            lines += [f"### {record['models'][model]}, {100 * p:.0f}% label noise", ""]
            if cal and cal.get("given"):
                lines += [f"Equal wall-clock: ERM gets {cal['erm']:.2f}× and SAM {cal['sam']:.2f}× the epochs "
                          "(--wallclock-factors).", ""]
            elif cal:
                ms = cal["step_ms"]
                lines += [f"Equal wall-clock: step times ERM {ms['erm']:.1f} ms, SAM {ms['sam']:.1f} ms, TSAM "
                          f"{ms['tsam']:.1f} ms (interleaved calibration), so ERM gets {cal['erm']:.2f}× and SAM "
                          f"{cal['sam']:.2f}× the epochs.", ""]
            lines += [head, "|---|" + "---:|" * 13]
            for e in entries:
                if e["table"] in ("radius", "efficient", "efficient_wallclock"):
                    continue
                ess, rng = _diag(e)
                lines.append(
                    f"| {e['label']} | {e['epochs']} | {_pm(e['test_acc'])} | {_pm(e['test_acc_selected'])} | "
                    f"{_delta(e.get('d_erm_test_acc'))} | {_delta(e.get('d_erm_test_acc_selected'))} | "
                    f"{_delta(e.get('d_sam_test_acc'))} | {_delta(e.get('d_sam_test_acc_selected'))} | "
                    f"{e['selected_epoch']['mean']:.1f} | {_pm(e['train_acc_noisy'])} | "
                    f"{e['sharpness']['mean']:.4f} | {ess} | {rng} | {e['train_s']['mean']:.0f} |")
            radius = [e for e in entries if e["table"] == "radius"]
            if radius:
                lines += ["", "Relative radius (radius_mode=\"relative\", start radius r·‖θ0‖) against the "
                          f"default absolute radius {cfg['radius']:g} at the same t; **bold** = the r chosen on the "
                          "noisy validation accuracy (mean best-val over seeds), never on the test labels.", "",
                          "| t | radius | val acc % (best-val) | test acc % final | best-val | Δ vs default radius "
                          "best-val | Δ vs SAM best-val | ESS | loss range | sharpness | ‖θ‖ final |",
                          "|---|---|" + "---:|" * 9]
                for t in sorted({e["tilt"] for e in radius}):
                    absolute = next((e for e in entries if e["method"] == tilt_key(t)), None)
                    rows = ([absolute] if absolute else []) + [e for e in radius if e["tilt"] == t]
                    for e in rows:
                        ess, rng = _diag(e)
                        name = f"{e['radius']:g}" + (" (absolute)" if e["table"] != "radius" else "·‖θ‖")
                        if e["method"] == level["chosen_radius"].get(f"{t:g}"):
                            name = f"**{name}**"
                        lines.append(
                            f"| {t:g} | {name} | {_pm(e['val_acc_selected'])} | {_pm(e['test_acc'])} | "
                            f"{_pm(e['test_acc_selected'])} | {_delta(e.get('d_abs_test_acc_selected'))} | "
                            f"{_delta(e.get('d_sam_test_acc_selected'))} | {ess} | {rng} | "
                            f"{e['sharpness']['mean']:.4f} | {e['param_norm']['mean']:.1f} |")
            efficient = [e for e in entries if e["table"] in ("efficient", "efficient_wallclock")]
            if efficient:
                cal_e = record["calibration"].get(f"{model}:efficient", {})
                factors = ", ".join(f"{k} {v:.2f}×" for k, v in cal_e.items() if k not in ("step_ms", "steps", "rounds"))
                lines += ["", "Compute-efficient TSAM (beyond the paper, docs/design.md §9) against the paper's TSAM "
                          f"at the same t (its Δ, paired by seed); equal wall-clock: the paper TSAM's step time over "
                          f"the option's ({factors}) times the epochs.", "",
                          "| method | epochs | backward passes / step | test acc % final | best-val | Δ vs TSAM final | "
                          "Δ vs TSAM best-val | Δ vs SAM best-val | ESS | time s |", "|---|" + "---:|" * 9]
                for e in efficient:
                    ess, _ = _diag(e)
                    steps = e["epochs"] * math.ceil(data["train"] / cfg.get("batch_size", 128))
                    lines.append(
                        f"| {e['label']} | {e['epochs']} | {e['passes'] / max(steps, 1):.2f} | {_pm(e['test_acc'])} | "
                        f"{_pm(e['test_acc_selected'])} | {_delta(e.get('d_abs_test_acc'))} | "
                        f"{_delta(e.get('d_abs_test_acc_selected'))} | {_delta(e.get('d_sam_test_acc_selected'))} | "
                        f"{ess} | {e['train_s']['mean']:.0f} |")
            lines.append("")
    return "\n".join(lines).rstrip("\n")


# -- output -------------------------------------------------------------------------------------


def plot(record: dict, path: Path) -> bool:
    """Best-val test accuracy per method (error bars: std over seeds), one panel per (model, noise)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    panels = [(model, level) for model, levels in record["summary"].items() for level in levels.values()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (model, level) in zip(axes[0], panels):
        entries = level["entries"]
        ys = list(range(len(entries)))
        for acc, marker, label in (("test_acc_selected", "o", "best-val epoch"), ("test_acc", "x", "final epoch")):
            ax.errorbar([100 * e[acc]["mean"] for e in entries], ys, xerr=[100 * e[acc]["std"] for e in entries],
                        fmt=marker, capsize=3, label=label)
        ax.set_yticks(ys)
        ax.set_yticklabels([e["label"] for e in entries], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{model}, {100 * level['noise']:.0f}% label noise", fontsize=10)
        ax.set_xlabel("clean test accuracy (%), mean ± std over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{record['data']['name']}, preset {record['config']['preset']}, seeds {record['config']['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


_NUMBER_LIST = re.compile(r"\[\s*-?\d[\d.eE+-]*(?:\s*,\s*-?\d[\d.eE+-]*)*\s*\]")


def compact_number_lists(text: str) -> str:
    """Put lists of plain numbers (per-epoch curves, seeds) on one line each; the parsed JSON is unchanged."""
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(0)[1:-1].split(",")) + "]", text)


def save(record: dict, out_dir: Path, make_plot: bool) -> List[Path]:
    written = harness.save(record, out_dir, f"generalization-{record['config']['preset']}", markdown=markdown(record),
                           plot=plot if make_plot else None)
    for path in written:
        if path.suffix == ".json":
            path.write_text(compact_number_lists(path.read_text()))
    record["files"] = [str(p) for p in written]
    return written
