"""Compile every Triton kernel variant for a GPU architecture without a GPU (Triton's ahead-of-time path:
TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas bundled in the triton wheel).

The CPU interpreter runs the kernels' Python semantics but never the GPU compiler, so type errors,
constexpr misuse or unsupported ops in the compiled path would otherwise first show up on a GPU.

    python -m tsam_fast._kernels.compile_check [--arch 90] [--quick]

Must run without ``TRITON_INTERPRET=1`` (the kernels must be ``JITFunction`` objects). Exit status 0
when every variant compiled; the failures are printed otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time


def variants(quick: bool):
    """(name, kernel attribute, signature, constexprs, num_warps) of the variants the launchers can use."""
    tile = dict(runs_ptr="*i64", n_runs="i32", search_steps="i32", a_start="i64", shift="i64", g_lo="i64",
                g_hi="i64")
    dtypes = ("*bf16",) if quick else ("*fp32", "*bf16", "*fp16")

    def flags(k):  # every combination of k mode switches, or all-on and all-off when quick
        return [(True,) * k, (False,) * k] if quick else list(itertools.product((True, False), repeat=k))

    out = []
    for multi, (block, warps) in ((False, (1024, 4)), (True, (2048, 8))):
        out.append(("noise_sqnorm_kernel", dict(partials_ptr="*fp32", seed="i64") | tile | dict(num_tiles="i64"),
                    dict(MULTI_RUN=multi, BLOCK=block), warps))
    for multi, aligned in flags(2):
        out.append(("fill_noise_kernel", dict(out_ptr="*fp32", coef_ptr="*fp32", seed="i64") | tile,
                    dict(MULTI_RUN=multi, ALIGNED=aligned, BLOCK=2048), 8))
    for dt in dtypes:
        for multi, aligned in flags(2):
            out.append(("sqnorm_kernel", dict(partials_ptr="*fp32", x_ptr=dt, scale_ptr=dt) | tile |
                        dict(num_tiles="i64"), dict(HAS_SCALE=True, MULTI_RUN=multi, ALIGNED=aligned, BLOCK=4096), 8))
        for save, noise, multi, aligned in flags(4):
            out.append(("perturb_kernel", dict(theta_ptr=dt, theta0_ptr=dt, coef_ptr="*fp32", seed="i64") | tile,
                        dict(SAVE_BACKUP=save, HAS_NOISE=noise, MULTI_RUN=multi, ALIGNED=aligned, BLOCK=1024), 4))
        for first, noise, multi, aligned in flags(4):
            out.append(("tilt_accumulate_kernel",
                        dict(acc_ptr="*fp32", grad_ptr=dt, a_ptr="*fp32", b_ptr="*fp32", theta_ptr=dt, theta0_ptr=dt,
                             coef_ptr="*fp32", seed="i64") | tile,
                        dict(FIRST=first, HAS_NOISE=noise, MULTI_RUN=multi, ALIGNED=aligned, BLOCK=2048), 8))
        for (mom, pre), (multi, aligned) in itertools.product(((False, False), (False, True), (True, False)),
                                                              flags(2)):
            out.append(("leapfrog_kernel", dict(theta_ptr=dt, grad_ptr=dt, kick_ptr="*fp32", drift_ptr="*fp32",
                                                mom_ptr="*fp32", precond_ptr=dt) | tile,
                        dict(HAS_MOMENTUM=mom, HAS_PRECOND=pre, MULTI_RUN=multi, ALIGNED=aligned, BLOCK=4096), 8))
        for first, multi, aligned in flags(3):
            out.append(("finalize_kernel", dict(acc_ptr="*fp32", grad_ptr=dt, a_ptr="*fp32", b_ptr="*fp32",
                                                inv_z_ptr="*fp32", theta_ptr=dt, theta0_ptr=dt) | tile,
                        dict(FIRST=first, MULTI_RUN=multi, ALIGNED=aligned, BLOCK=4096), 8))
    out.append(("sum_partials_kernel", dict(out_ptr="*fp32", partials_ptr="*fp32", n_partials="i32"),
                dict(BLOCK=1024), 4))
    for normals, out_type in ((False, "*i32"), (True, "*fp32")):
        out.append(("generator_kernel", dict(out_ptr=out_type, counters_ptr="*i64", seed="i64", n="i32"),
                    dict(NORMALS=normals, BLOCK=1024), 4))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    p.add_argument("--quick", action="store_true", help="bf16 and two flag combinations per kernel only")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import tsam_kernels as K

    target = GPUTarget("cuda", args.arch, 32)
    failures, t0 = [], time.time()
    todo = variants(args.quick)
    for name, sig, const, warps in todo:
        try:
            triton.compile(ASTSource(getattr(K, name), sig, const), target=target,
                           options=dict(num_warps=warps, enable_fp_fusion=False))
        except Exception as exc:  # collected and printed: every variant is tried
            failures.append(f"{name} {const}: {type(exc).__name__}: {exc}")
    for f in failures:
        print("FAILED", f)
    print(f"compile_check: {len(todo) - len(failures)} of {len(todo)} variants compiled for sm_{args.arch} "
          f"(triton {triton.__version__}) in {time.time() - t0:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
