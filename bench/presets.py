"""The throughput benchmark's modes and their presets: per mode, per device type, per size, the models, the
rows and the timing (``--mode``, ``--size``; every command-line option overrides them), and the base
optimizers every row shares (``--base``).
"""

from __future__ import annotations

from typing import List

import torch

from models import ModelSpec

MODES = ("models", "overhead", "gpu", "fixed", "ops")

GPT_LM = dict(dim=256, layers=6, heads=4, vocab=1024, seq_len=64, batch=8)  # 5.3M parameters in 77 tensors
MLP_10M = dict(width=1536, depth=5, in_dim=256, batch=64)  # 9.85M parameters in 12 tensors

# Per mode, per device type, per size: models ({kind: [options, ...]}), methods (None: every row),
# timing; time_budget is the seconds of the whole run: checks, warm-ups and timing of every model.
# CPU models/small is the README's default run: about 2 minutes on 2 cores (124 s on 2026-12-04), checks
# included; its 180 s budget holds a loaded machine near 3 minutes.
PRESETS = {
    "models": {
        "cpu": {
            "small": dict(models=dict(mlp=[dict(width=512)], cnn=[dict(width=16, batch=16)], gpt=[GPT_LM]),
                          warmup=2, steps=15, min_steps=5, row_budget=8.0, time_budget=180.0),
            "medium": dict(models=dict(mlp=[dict(width=512), dict(width=1024), dict(width=2048)],
                                       cnn=[dict(width=32)], gpt=[GPT_LM, dict(GPT_LM, dim=512)]),
                           warmup=3, steps=30, min_steps=5, row_budget=15.0, time_budget=900.0),
            "large": dict(models=dict(mlp=[dict(width=1024), dict(width=2048), dict(width=4096)],
                                      cnn=[dict(width=64, blocks=2)], gpt=[dict(dim=512, layers=6, seq_len=128)]),
                          warmup=3, steps=30, min_steps=5, row_budget=30.0, time_budget=2700.0),
        },
        "cuda": {
            "small": dict(models=dict(mlp=[dict(width=1024), dict(width=4096)],
                                      cnn=[dict(width=64, blocks=2, batch=128)],
                                      gpt=[dict(dim=512, layers=6, heads=8, vocab=8192, seq_len=256, batch=16)]),
                          warmup=5, steps=50, min_steps=10, row_budget=3.0, time_budget=180.0),
            "medium": dict(models=dict(mlp=[dict(width=1024), dict(width=2048), dict(width=4096), dict(width=5120)],
                                       cnn=[dict(width=128, blocks=2, batch=128)],
                                       gpt=[dict(dim=768, layers=12, heads=12, vocab=16384, seq_len=256, batch=16)]),
                           warmup=5, steps=100, min_steps=10, row_budget=10.0, time_budget=600.0),
            "large": dict(models=dict(mlp=[dict(width=2048), dict(width=4096), dict(width=8192)],
                                      cnn=[dict(width=128, blocks=3, batch=256)],
                                      gpt=[dict(dim=1024, layers=24, heads=16, vocab=32768, seq_len=512, batch=8)]),
                          warmup=5, steps=100, min_steps=10, row_budget=20.0, time_budget=1500.0),
        },
    },
    "overhead": {
        "cpu": {
            "small": dict(models=dict(mlp=[MLP_10M], gpt=[GPT_LM]), eager_reference=True,
                          methods="tsam_authors,tsam_foreach,tsam_fast_reference,tsam_fast_reference_eager,tsam_fast_cpp",
                          warmup=2, steps=10, min_steps=4, row_budget=20.0, time_budget=600.0),
        },
        "cuda": {
            "small": dict(models=dict(mlp=[dict(width=4096)], gpt=[dict(dim=768, layers=12, heads=12, vocab=16384,
                                                                        seq_len=256, batch=16)]),
                          eager_reference=True, warmup=3, steps=20, min_steps=5, row_budget=5.0, time_budget=300.0),
        },
    },
    "gpu": {
        "cuda": {
            "small": dict(models=dict(flat=[dict(numel=int(50e6), tensors=200), dict(numel=int(200e6), tensors=200),
                                            dict(numel=int(500e6), tensors=200)]),
                          methods="tsam_authors,tsam_foreach,tsam_fast_triton", authors_max=200e6,
                          warmup=3, steps=15, min_steps=5, row_budget=10.0, time_budget=120.0),
        },
        "cpu": {  # the same code path on a CPU, for the smoke test and for a look without a GPU
            "small": dict(models=dict(flat=[dict(numel=int(4e6), tensors=20)]),
                          methods="tsam_authors,tsam_foreach,tsam_fast_cpp", authors_max=200e6,
                          warmup=2, steps=10, min_steps=3, row_budget=5.0, time_budget=60.0),
        },
    },
    "fixed": {
        "cpu": {
            "small": dict(models=dict(mlp=[dict(in_dim=8, width=8, depth=1, classes=2, batch=16)]), loops=True,
                          methods="tsam_foreach,tsam_fast_reference,tsam_fast_reference_loop,tsam_fast_cpp,"
                                  "tsam_fast_cpp_loop", threads=1,
                          warmup=100, steps=1500, min_steps=200, row_budget=60.0, time_budget=120.0),
        },
    },
}
PRESETS["fixed"]["cuda"] = PRESETS["fixed"]["cpu"]

BASE_OPTIMIZERS = {
    "sgd": (torch.optim.SGD, lambda a: dict(lr=a.lr, momentum=a.momentum)),
    "adamw": (torch.optim.AdamW, lambda a: dict(lr=a.lr)),
}


def preset_for(args, device: torch.device) -> dict:
    """The preset of ``--mode`` and ``--size`` on ``device``'s type; exits in words when there is none."""
    by_device = PRESETS[args.mode]
    if device.type not in by_device:
        raise SystemExit(f"--mode {args.mode} has no preset for {device.type} (has: {', '.join(by_device)})")
    sizes = by_device[device.type]
    if args.size not in sizes:
        raise SystemExit(f"--mode {args.mode} on {device.type}: sizes {', '.join(sizes)}")
    return sizes[args.size]


def model_specs(args, preset: dict) -> List[ModelSpec]:
    """The preset's models (``--models`` picks kinds), with the command line's sizes over the preset's."""
    overrides = {
        "mlp": dict(depth=args.mlp_depth),
        "cnn": dict(width=args.cnn_width, blocks=args.cnn_blocks),
        "gpt": dict(dim=args.gpt_dim, layers=args.gpt_layers, heads=args.gpt_heads, vocab=args.vocab,
                    seq_len=args.seq_len),
        "flat": dict(tensors=args.tensors),
    }
    kinds = list(preset["models"]) if args.models is None else [k.strip() for k in args.models.split(",") if k.strip()]
    specs = []
    for kind in kinds:
        if kind not in overrides:
            raise SystemExit(f"--models: unknown model {kind!r}; choose from {', '.join(overrides)}")
        variants = preset["models"].get(kind) or [{}]
        if kind == "mlp" and args.mlp_width:
            variants = [dict(variants[0], width=w) for w in args.mlp_width]
        if kind == "flat" and args.sizes:
            variants = [dict(variants[0], numel=int(float(x))) for x in args.sizes.split(",") if x]
        for v in variants:
            opts = {**v, **{k: x for k, x in overrides[kind].items() if x is not None}}
            if args.batch_size is not None:
                opts["batch"] = args.batch_size
            specs.append(ModelSpec(kind, opts))
    return specs
