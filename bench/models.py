"""The benchmark's models: real ``nn.Module``s on synthetic data made in-process (no downloads).

* ``mlp``: a GELU MLP whose hidden width sets the parameter count (about ``(depth - 1) * width**2``),
  so one knob spans 1M to 100M+ parameters and the optimizer's element-wise work dominates.
* ``cnn``: a ResNet-style CNN with batch norm on 32x32 RGB images (CIFAR-shaped); many small tensors.
* ``gpt``: a GPT-style decoder (causal self-attention, pre-LayerNorm) on random token ids: 12 parameter
  tensors per block plus 5, so ``layers=6`` gives the 77-tensor, 5.3M-parameter transformer LM of the
  default CPU run.
* ``flat``: ``numel`` parameters split into ``tensors`` tensors and a loss ``sum_i <p_i, c_i>`` whose
  backward writes a fixed gradient: a model that costs one pass, so the optimizer's own work is all
  there is (the GPU overhead mode, 50M-500M parameters).

The first three are classifiers trained with cross-entropy, so one closure serves all of them.

Activations are smooth (GELU, SiLU): the benchmark checks each method's update against the reference
before timing it, and with ReLU a rounding-level difference in the perturbed parameters can flip a
unit and change a whole row of the gradient, so two correct implementations would disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ModelSpec", "Workload", "build"]


@dataclass(frozen=True)
class ModelSpec:
    """What to build: ``kind`` is mlp, cnn or gpt; ``options`` are that kind's size knobs."""

    kind: str
    options: Dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        knobs = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.kind}({knobs})"


@dataclass
class Workload:
    """A model with its fixed synthetic batch; ``make_model`` rebuilds identical copies."""

    spec: ModelSpec
    make_model: Callable[[], nn.Module]
    inputs: torch.Tensor
    targets: torch.Tensor
    samples_per_batch: int
    tokens_per_batch: int  # 0 for models that do not read tokens

    def loss(self, model: nn.Module) -> torch.Tensor:
        out = model(self.inputs)
        if out.dim() == 0:  # ``flat``: the model is its own loss
            return out
        return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), self.targets.reshape(-1))


class MLP(nn.Module):
    def __init__(self, in_dim: int, width: int, depth: int, classes: int):
        super().__init__()
        dims = [in_dim] + [width] * depth
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(x))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.silu(self.bn1(self.conv1(x)))
        return F.silu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet layout: 3x3 stem, three stages of width c, 2c, 4c (stride 2 between), pool, fc."""

    def __init__(self, width: int, blocks: int, classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.SiLU())
        stages, c_in = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                stages.append(BasicBlock(c_in, c_out, 2 if (i > 0 and b == 0) else 1))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1))


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.blocks = nn.Sequential(*[DecoderBlock(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos[: idx.shape[1]])))


class Flat(nn.Module):
    """``numel`` parameters in ``tensors`` tensors; ``forward`` returns ``sum_i <p_i, c_i>`` (gradient c)."""

    def __init__(self, numel: int, tensors: int):
        super().__init__()
        sizes = [numel // tensors + (1 if i < numel % tensors else 0) for i in range(tensors)]
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(n) * 0.02) for n in sizes])
        for i, n in enumerate(sizes):
            self.register_buffer(f"c{i}", torch.randn(n) * 0.01)

    def forward(self, _x):
        return sum(torch.dot(p, getattr(self, f"c{i}")) for i, p in enumerate(self.ps))


# Knobs of each kind, with the values used when a preset or the command line leaves one out.
DEFAULTS = {
    "mlp": dict(width=512, depth=5, in_dim=256, classes=10, batch=64),
    "cnn": dict(width=16, blocks=1, classes=10, batch=32),
    "gpt": dict(dim=128, layers=2, heads=4, vocab=1024, seq_len=64, batch=8),
    "flat": dict(numel=1_000_000, tensors=1, batch=1),
}


def build(spec: ModelSpec, device: torch.device, seed: int = 0) -> Workload:
    """The model of ``spec`` on ``device`` with a fixed random batch; copies share one initialisation."""
    o = {**DEFAULTS[spec.kind], **spec.options}
    g = torch.Generator().manual_seed(seed + 1)
    if spec.kind == "mlp":
        def ctor():
            return MLP(o["in_dim"], o["width"], o["depth"], o["classes"])
        inputs = torch.randn(o["batch"], o["in_dim"], generator=g)
        targets = torch.randint(0, o["classes"], (o["batch"],), generator=g)
        tokens = 0
    elif spec.kind == "cnn":
        def ctor():
            return ResNet(o["width"], o["blocks"], o["classes"])
        inputs = torch.randn(o["batch"], 3, 32, 32, generator=g)
        targets = torch.randint(0, o["classes"], (o["batch"],), generator=g)
        tokens = 0
    elif spec.kind == "gpt":
        def ctor():
            return GPT(o["vocab"], o["dim"], o["layers"], o["heads"], o["seq_len"])
        # next-token prediction on a random sequence: targets are the inputs shifted by one
        seq = torch.randint(0, o["vocab"], (o["batch"], o["seq_len"] + 1), generator=g)
        inputs, targets = seq[:, :-1], seq[:, 1:]
        tokens = o["batch"] * o["seq_len"]
    elif spec.kind == "flat":
        def ctor():
            return Flat(o["numel"], o["tensors"])
        inputs, targets, tokens = torch.zeros(1), torch.zeros(1, dtype=torch.int64), 0
    else:
        raise ValueError(f"unknown model kind {spec.kind!r}: expected mlp, cnn, gpt or flat")

    if spec.kind == "flat":  # large: built on the device, from a seed, without a CPU state copy
        def make_model() -> nn.Module:
            torch.manual_seed(seed)
            with torch.device(device):
                return ctor().train()
    else:
        torch.manual_seed(seed)
        state = {k: v.clone() for k, v in ctor().state_dict().items()}

        def make_model() -> nn.Module:
            model = ctor()
            model.load_state_dict(state)
            return model.to(device).train()

    return Workload(ModelSpec(spec.kind, o), make_model, inputs.to(device), targets.to(device),
                    o["batch"], tokens)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
