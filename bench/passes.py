"""Forward/backward passes per step, and what they cost: ERM, SAM, the paper's TSAM and the compute-efficient
options (docs/design.md §9), side by side in one run.

    python bench/passes.py                    # the 5.3M-parameter / 77-tensor GPT and the MLP, s = 3 and 8
    python bench/passes.py --models gpt --samples 3 --steps 10

Rows (interleaved step by step, rotating order; every method from the same initial model):

  erm        the base optimizer alone (SGD with momentum)
  sam        TSAM(num_samples=1, start="none"): SAM, 2 passes
  tsam       the paper's TSAM (ascent sampler): 2s passes
  shared     shared_ascent=True: s + 1
  sampled1   shared_ascent + backward_samples=1: s forwards + 2 passes
  every3     tilt_every=3: (2s + 1) on every third step, 1 between

Per row: backward passes (forward+backward) and forward-only passes per step (measured: the closure counts
them), their forward/backward equivalents (a forward counted as 1/3 of a forward+backward), the step time
(mean over the steps, a multiple of 3 so that every3's full and cheap steps are in proportion; median and
IQR beside it) and samples/s, each relative to the paper's TSAM. The time falls with the equivalents as far
as the optimizer's own work (a few passes over the parameters per evaluation) and the forward/backward ratio
of the model allow.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from models import ModelSpec, build  # noqa: E402
from presets import GPT_LM  # noqa: E402

from tsam_fast import TSAM  # noqa: E402

FORWARD_SHARE = 1 / 3  # a forward pass as a fraction of a forward+backward pass (backward ~ 2 forwards)
METHODS = {
    "erm": None,
    "sam": dict(num_samples=1, start="none"),
    "tsam": dict(),
    "shared": dict(shared_ascent=True),
    "sampled1": dict(shared_ascent=True, backward_samples=1),
    "every3": dict(tilt_every=3),
}
MODELS = {"gpt": ("gpt", GPT_LM), "mlp": ("mlp", dict(width=1024, depth=5, in_dim=256, batch=64)),
          # the ~110M-parameter GPT of the GPU's end-to-end runs (bench/gpu_check.sh)
          "gpt110m": ("gpt", dict(dim=768, layers=12, heads=12, vocab=16384, seq_len=256, batch=16))}


def _row(method, workload, device, s):
    model = workload.make_model()
    counts = {"backward": 0, "forward": 0}

    def closure(backward=True):
        counts["backward" if backward else "forward"] += 1
        loss = workload.loss(model)
        if backward:
            loss.backward()
        return loss

    options = METHODS[method]
    if options is None:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            opt.zero_grad()
            closure()
            opt.step()
    else:
        opt = TSAM(model.parameters(), torch.optim.SGD, lr=1e-3, momentum=0.9, tilt=1.0, rho=0.05, radius=0.05,
                   **{"num_samples": s, **options})

        def step():
            opt.step(closure)
    return step, counts


def measure(model_key, s, methods, steps, warmup, device):
    kind, opts = MODELS[model_key]
    workload = build(ModelSpec(kind, opts), device)
    rows = {m: _row(m, workload, device, s) for m in methods}
    timer = harness.Timer(device)
    times = {m: [] for m in methods}
    for _ in range(warmup):
        for m in methods:
            rows[m][0]()
    for m in methods:
        rows[m][1].update(backward=0, forward=0)
    timer.sync()
    for i in range(steps):
        order = methods[i % len(methods):] + methods[:i % len(methods)]
        for m in order:
            timer.time(rows[m][0], times[m])
    timer.flush()
    out = []
    for m in methods:
        counts = rows[m][1]
        backward, forward = counts["backward"] / steps, counts["forward"] / steps
        st = harness.summarize(times[m])
        out.append(dict(method=m, model=model_key, s=s, backward=backward, forward=forward,
                        equivalents=backward + FORWARD_SHARE * forward, step_ms=st,
                        samples_per_s=workload.samples_per_batch / (st["mean"] / 1e3)))
    paper = next(r for r in out if r["method"] == "tsam")
    for r in out:
        r["fewer_equivalents"] = paper["equivalents"] / r["equivalents"]
        r["speedup"] = paper["step_ms"]["mean"] / r["step_ms"]["mean"]
    return dict(model=model_key, params=sum(p.numel() for p in workload.make_model().parameters()),
                tensors=len(list(workload.make_model().parameters())), s=s, rows=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt,mlp", help=f"comma-separated of {', '.join(MODELS)}")
    ap.add_argument("--samples", default="3,8", help="TSAM's s, comma-separated (default 3,8)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated of {', '.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per row (a multiple of 3 keeps every3 fair)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    harness.add_output_options(ap, "the JSON and markdown")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if "tsam" not in methods or set(methods) - set(METHODS):
        ap.error(f"--methods: choose from {', '.join(METHODS)}, including tsam (the reference of the ratios)")
    device = torch.device(args.device)
    record = harness.machine_record(device)
    record.update(mode="passes", forward_share=FORWARD_SHARE, steps=args.steps, results=[])
    text = []
    for model_key in [m for m in args.models.split(",") if m]:
        for s in [int(v) for v in args.samples.split(",") if v]:
            res = measure(model_key, s, methods, args.steps, args.warmup, device)
            record["results"].append(res)
            head = ["method", "backward passes / step", "forward-only / step", "fwd+bwd equivalents",
                    "÷ paper TSAM's", "step ms (mean; median [IQR])", "samples/s", "speed-up vs paper TSAM"]
            rows = [[r["method"], f"{r['backward']:.2f}", f"{r['forward']:.2f}", f"{r['equivalents']:.2f}",
                     f"{r['fewer_equivalents']:.2f}×",
                     f"{r['step_ms']['mean']:.1f}; {r['step_ms']['median']:.1f} [{r['step_ms']['q25']:.1f}, "
                     f"{r['step_ms']['q75']:.1f}]",
                     f"{r['samples_per_s']:.0f}", f"{r['speedup']:.2f}×"] for r in res["rows"]]
            text.append(f"{model_key} ({harness.fmt_count(res['params'])} parameters, {res['tensors']} tensors), "
                        f"s = {s}, {args.steps} steps per row on {record['device'].get('name', args.device)}\n\n"
                        + harness.markdown_table(head, rows))
            print(text[-1] + "\n", flush=True)
    md = "\n\n".join(text) + (f"\n\nA forward-only pass counts as {FORWARD_SHARE:.2f} of a forward+backward "
                              "pass in the equivalents; times are means over the timed steps.")
    for path in harness.save(record, harness.output_dir(args), f"passes-{device.type}", markdown=md):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
