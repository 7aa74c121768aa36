"""The save paths people use, with TSAM as with plain ``torch.optim``: one table of workflows, each run twice
after a few optimizer steps on the same small model -- once with plain ``torch.optim.AdamW``, once with
``TSAM(..., torch.optim.AdamW, ...)`` -- and the two runs must end the same way (the same files with the
same sizes where files are written, an exact round trip of every value).

TSAM never re-points a parameter's ``.data`` (tsam_fast/flat.py): its own state lives in separate buffers,
only ``p.grad`` may be a view of a flat gradient buffer. A save path that detects shared storage
(safetensors), writes whole storages (``torch.save``) or shares parameters between processes (Hogwild) must
therefore see exactly what it sees with plain ``torch.optim``; a parameter whose tensor is replaced
(``vector_to_parameters``) is laid out again at the next step.
"""

from __future__ import annotations

import copy
import io
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from tsam_fast import TSAM

from tables import CONFIGS as _CONFIGS, TOYS, assert_same, one_step, one_thread, positions, run_ranks  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
LR = 1e-2
TSAM_OPTIONS = dict(rho=0.05, num_samples=2, seed=0)


def plain(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR)


def tsam(params) -> TSAM:
    return TSAM(params, torch.optim.AdamW, lr=LR, **TSAM_OPTIONS)


OPTIMIZERS: Dict[str, Callable] = {"plain": plain, "tsam": tsam}


# -- the model and its training ---------------------------------------------------------------------

VOCAB, WIDTH, CLASSES = 24, 16, 4


class Block(nn.Module):
    """A residual MLP block: Linear(16, 32), GELU, Linear(32, 16), LayerNorm (6 tensors)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(2 * WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, h):
        return self.norm(h + self.down(F.gelu(self.up(h))))


class Net(nn.Module):
    """18 parameter tensors of 7 sizes (384, 512, 48, 32, 16, 192, 12): an embedding, two blocks, a
    LayerNorm, a head and a bias-free output layer; tokens (batch, 5) -> class logits."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.block = Block()
        self.block2 = Block()
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 12)
        self.out = nn.Linear(12, CLASSES, bias=False)

    def forward(self, tokens):
        h = self.norm(self.block2(self.block(self.embed(tokens)))).mean(1)
        return self.out(F.gelu(self.head(h)))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, VOCAB, (8, 5), generator=g), torch.randint(0, CLASSES, (8,), generator=g)


def step(model: nn.Module, opt, seed: int) -> torch.Tensor:
    """One optimizer step on a fresh batch (``seed``), the same call for plain AdamW and TSAM; returns what
    the step returns (Accelerate's wrapper returns nothing: then the closure's last loss)."""
    x, y = batch(seed)
    losses = []

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.detach())
        return loss
    opt.zero_grad()
    result = opt.step(closure)
    return losses[-1] if result is None else result


def train(model: nn.Module, opt, steps: int = STEPS, first: int = 0) -> None:
    for i in range(first, first + steps):
        loss = step(model, opt, i)
        assert torch.isfinite(loss)


def trained(kind: str):
    model = net()
    opt = OPTIMIZERS[kind](model.parameters())
    train(model, opt)
    return model, opt


def values(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_exact(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], what: str) -> None:
    assert sorted(actual) == sorted(expected), f"{what}: keys {sorted(actual)} != {sorted(expected)}"
    bad = [k for k in expected if not (actual[k].dtype == expected[k].dtype and torch.equal(actual[k], expected[k]))]
    assert not bad, f"{what}: {bad} differ"


def files(directory: Path) -> Dict[str, int]:
    """Every file under ``directory``: relative path -> size in bytes."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def shards(written: Dict[str, int], suffix: str) -> Dict[str, int]:
    return {k: v for k, v in written.items() if k.endswith(suffix)}


def read_sharded(directory: Path, index: str) -> Dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint, read back file by file through its index."""
    weight_map = json.loads((directory / index).read_text())["weight_map"]
    out: Dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map.values())):
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file
            part = load_file(str(directory / name))
        else:
            part = torch.load(directory / name, weights_only=True)
        assert set(part) == {k for k, v in weight_map.items() if v == name}, f"{name}: not what the index says"
        out.update(part)
    return out


def prepared(kind: str, seed: int = 0):
    """A fresh ``Accelerator`` on the CPU with the model and its optimizer of ``kind`` prepared."""
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    model = net(seed=seed)
    model, opt = accelerator.prepare(model, OPTIMIZERS[kind](model.parameters()))
    return accelerator, model, opt


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


# -- the workflows ------------------------------------------------------------------------------------
# Each takes the optimizer's kind ("plain" | "tsam") and a directory of its own; it asserts what must hold in
# any run (an exact round trip) and returns what must be the same for both kinds.

def accelerate_save_state(kind: str, d: Path) -> Dict[str, Any]:
    """``Accelerator().prepare(model, opt)``, ``save_state(dir)`` (safetensors, the default), ``load_state``
    into a fresh model and optimizer: every tensor of the model and the optimizer's state_dict back bit for
    bit, the model file holds all 18 tensors, and one more step from the loaded state equals one more step
    from the original. (With TSAM's former flat parameters, safetensors saw one shared storage and
    Accelerate kept 1 of the 18 tensors.) Compared: the file names, and the sizes of every file but the
    optimizer's (TSAM's state_dict holds its own entries besides AdamW's)."""
    from safetensors.torch import load_file
    reset_accelerate()
    try:
        accelerator, model, opt = prepared(kind)
        train(model, opt)
        accelerator.save_state(str(d / "state"))
        saved = values(model)
        saved_opt = copy.deepcopy(opt.state_dict())
        written = files(d / "state")
        model_file = [k for k in written if k.startswith("model") and k.endswith(".safetensors")]
        assert model_file == ["model.safetensors"], written
        assert_exact(load_file(str(d / "state" / "model.safetensors")), saved, f"{kind}: model.safetensors")

        fresh_accelerator, fresh, fresh_opt = prepared(kind, seed=1)
        fresh_accelerator.load_state(str(d / "state"))
        assert_exact(values(fresh), saved, f"{kind}: the model after load_state")
        assert_same(fresh_opt.state_dict(), saved_opt, f"{kind}: the optimizer's state_dict after load_state")
        step(model, opt, STEPS)
        step(fresh, fresh_opt, STEPS)
        assert_exact(values(fresh), values(model), f"{kind}: the step after load_state")
    finally:
        reset_accelerate()
    optimizer_files = {k for k in written if k.startswith("optimizer")}
    assert optimizer_files, written
    return dict(files=sorted(written), sizes={k: v for k, v in written.items() if k not in optimizer_files})


def _accelerate_save_model(kind: str, d: Path, safe: bool) -> Dict[str, Any]:
    from accelerate import load_checkpoint_in_model
    reset_accelerate()
    try:
        accelerator, model, opt = prepared(kind)
        train(model, opt)
        accelerator.save_model(model, str(d / "model"), max_shard_size="3KB", safe_serialization=safe)
    finally:
        reset_accelerate()
    saved = values(model)
    written = files(d / "model")
    suffix, index = (".safetensors", "model.safetensors.index.json") if safe else \
        (".bin", "pytorch_model.bin.index.json")
    assert len(shards(written, suffix)) > 2, f"{kind}: expected several shards, got {written}"
    assert_exact(read_sharded(d / "model", index), saved, f"{kind}: the shards")
    fresh = net(seed=1)
    load_checkpoint_in_model(fresh, str(d / "model"))
    assert_exact(values(fresh), saved, f"{kind}: the model loaded from the shards")
    return dict(written=written)


def accelerate_save_model(kind: str, d: Path) -> Dict[str, Any]:
    """``accelerator.save_model(model, dir, max_shard_size="3KB")`` (safetensors): several shards and an
    index, read back exactly (file by file, and by ``accelerate.load_checkpoint_in_model`` into a fresh
    model). Compared: the same files with the same sizes."""
    return _accelerate_save_model(kind, d, safe=True)


def accelerate_save_model_bin(kind: str, d: Path) -> Dict[str, Any]:
    """The same with ``safe_serialization=False`` (``torch.save`` shards, which would write a whole shared
    storage into every shard). Compared: the same number of shards, each within 5% of plain's size."""
    return _accelerate_save_model(kind, d, safe=False)


def compare_bin_shards(plain_: Dict[str, Any], tsam_: Dict[str, Any]) -> None:
    a, b = shards(plain_["written"], ".bin"), shards(tsam_["written"], ".bin")
    assert sorted(a) == sorted(b), f"shards: plain {sorted(a)} vs TSAM {sorted(b)}"
    for k in a:
        assert abs(b[k] - a[k]) <= 0.05 * a[k], f"{k}: {b[k]} bytes with TSAM, {a[k]} with plain AdamW"


def safetensors_save_model(kind: str, d: Path) -> Dict[str, Any]:
    """``safetensors.torch.save_model`` / ``load_model`` into a fresh model: exact. (save_model refuses or
    drops tensors that share storage.) Compared: the file's size."""
    from safetensors.torch import load_model, save_model
    model, _ = trained(kind)
    save_model(model, str(d / "model.safetensors"))
    fresh = net(seed=1)
    missing, unexpected = load_model(fresh, str(d / "model.safetensors"))
    assert not missing and not unexpected, (missing, unexpected)
    assert_exact(values(fresh), values(model), f"{kind}: safetensors load_model")
    return dict(written=files(d))


def hub_save_torch_model(kind: str, d: Path) -> Dict[str, Any]:
    """``huggingface_hub.save_torch_model(max_shard_size="4KB")`` (safetensors shards and an index) /
    ``load_torch_model`` into a fresh model: exact. Compared: the same files with the same sizes."""
    hub = pytest.importorskip("huggingface_hub")
    if not hasattr(hub, "save_torch_model"):
        pytest.skip(f"huggingface_hub {hub.__version__} has no save_torch_model")
    model, _ = trained(kind)
    (d / "model").mkdir()
    hub.save_torch_model(model, str(d / "model"), max_shard_size="4KB")
    saved = values(model)
    fresh = net(seed=1)
    if hasattr(hub, "load_torch_model"):
        hub.load_torch_model(fresh, str(d / "model"))
    else:  # an older huggingface_hub: read the shards through their index
        fresh.load_state_dict(read_sharded(d / "model", "model.safetensors.index.json"))
    assert_exact(values(fresh), saved, f"{kind}: huggingface_hub round trip")
    written = files(d / "model")
    assert len(shards(written, ".safetensors")) > 2, f"{kind}: expected several shards, got {written}"
    assert_exact(read_sharded(d / "model", "model.safetensors.index.json"), saved, f"{kind}: the shards")
    return dict(written=written)


def tiny_gpt2():
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def hf_save_pretrained(kind: str, d: Path) -> Dict[str, Any]:
    """A tiny GPT-2 (built from a config: nothing downloaded; tied input/output embeddings) trained a few
    steps on random tokens, ``save_pretrained(max_shard_size="8KB")`` and ``from_pretrained(...,
    local_files_only=True)``: every tensor exact, the tie kept. Compared: the same files and sizes."""
    import transformers
    model = tiny_gpt2()
    opt = OPTIMIZERS[kind](model.parameters())
    for i in range(STEPS):
        ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(i))

        def closure():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss
        opt.zero_grad()
        assert torch.isfinite(opt.step(closure))
    model.save_pretrained(str(d / "gpt2"), max_shard_size="8KB")
    written = files(d / "gpt2")
    assert len(shards(written, ".safetensors")) > 2, f"{kind}: expected several shards, got {written}"
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(d / "gpt2"), local_files_only=True)
    assert_exact(values(loaded), values(model), f"{kind}: from_pretrained")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    return dict(written=written)


def submodule_torch_save(kind: str, d: Path) -> Dict[str, Any]:
    """``torch.save(model.block.state_dict())`` of one sub-module (6 of the 18 tensors): read back exactly;
    compared: the bytes, within 5% of plain's (a view into a flat buffer of the whole model would drag the
    whole buffer into the file)."""
    model, _ = trained(kind)
    buffer = io.BytesIO()
    torch.save(model.block.state_dict(), buffer)
    buffer.seek(0)
    assert_exact(torch.load(buffer, weights_only=True), values(model.block), f"{kind}: torch.load")
    return dict(bytes=buffer.getbuffer().nbytes)


def compare_bytes(plain_: Dict[str, Any], tsam_: Dict[str, Any]) -> None:
    a, b = plain_["bytes"], tsam_["bytes"]
    assert abs(b - a) <= 0.05 * a, f"{b} bytes with TSAM, {a} with plain AdamW"


def _hogwild_worker(rank: int, model: nn.Module, kind: str) -> None:
    torch.set_num_threads(1)
    opt = OPTIMIZERS[kind](model.parameters())
    train(model, opt, first=10 * (rank + 1))


def hogwild(kind: str, d: Path) -> Dict[str, Any]:
    """Hogwild: ``model.share_memory()``, 2 spawned workers, each with its own optimizer, train the shared
    parameters; the parent sees every parameter tensor moved (it would see none move if the optimizer
    re-pointed the workers' parameters into memory of its own). A worker that fails fails the test; a run
    past 120 s is killed (tables.run_ranks)."""
    model = net()
    model.share_memory()
    before = values(model)
    run_ranks(_hogwild_worker, 2, model, kind, timeout=120)
    after = values(model)
    assert all(torch.isfinite(v).all() for v in after.values())
    moved = {k: not torch.equal(after[k], before[k]) for k in before}
    assert all(moved.values()), f"{kind}: the parent sees {[k for k, m in moved.items() if not m]} unmoved"
    return dict(moved=moved)


def vector_to_parameters_row(kind: str, d: Path) -> Dict[str, Any]:
    """``vector_to_parameters(0.5 * parameters_to_vector(...) + 0.01, ...)`` after 2 steps: every parameter
    now a view of the new vector (shared storage). ``parameters_to_vector`` returns what was set; the next
    step runs, moves every parameter to finite values, starts from the new values (its loss differs from
    the same step taken at the old values) and equals, bit for bit, the step of a fresh optimizer given this
    one's state_dict on an independent copy of the model at the new values."""
    model = net()
    opt = OPTIMIZERS[kind](model.parameters())
    train(model, opt, steps=2)
    params = list(model.parameters())

    def twin(state: Dict[str, torch.Tensor]):
        other = net(seed=1)
        other.load_state_dict(state)
        other_opt = OPTIMIZERS[kind](other.parameters())
        other_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        return other, other_opt

    old_model, old_opt = twin(values(model))
    new = parameters_to_vector(params) * 0.5 + 0.01
    vector_to_parameters(new, params)
    assert torch.equal(parameters_to_vector(params), new)
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1  # views of `new`
    at_new = values(model)
    copy_model, copy_opt = twin(at_new)

    loss = step(model, opt, 2)
    after = values(model)
    assert all(torch.isfinite(v).all() for v in after.values()), f"{kind}: non-finite parameters"
    moved = {k: not torch.equal(after[k], at_new[k]) for k in at_new}
    assert all(moved.values()), f"{kind}: the step left {[k for k, m in moved.items() if not m]} unmoved"
    assert torch.equal(parameters_to_vector(model.parameters()), new), \
        f"{kind}: the step did not write into the parameters' (new) storage"
    copy_loss = step(copy_model, copy_opt, 2)
    assert torch.equal(loss, copy_loss), f"{kind}: loss {loss} != {copy_loss} of a fresh copy at the new values"
    assert_exact(after, values(copy_model), f"{kind}: the step after vector_to_parameters vs a fresh copy")
    old_loss = step(old_model, old_opt, 2)
    assert not torch.equal(loss, old_loss), f"{kind}: the step's loss is the one of the old values"
    return dict(moved=moved)


def assign_row(kind: str, d: Path) -> Dict[str, Any]:
    """``model.load_state_dict(sd, assign=True)`` after 2 steps: the module now holds new Parameter objects,
    the optimizer the old ones, which receive no gradient. Plain AdamW's next step then silently does
    nothing (no gradient on its parameters: the model stays at the loaded values). TSAM's step raises a
    RuntimeError naming the cause ("... load_state_dict(..., assign=True) ... construct TSAM again on
    model.parameters()") and leaves the model as it was; silence like plain's would be accepted too.
    Either way, an optimizer constructed again on ``model.parameters()`` trains the model."""
    model, opt = trained(kind)
    old = list(model.parameters())
    sd = values(model)
    model.load_state_dict(values(model), assign=True)  # a copy: the module takes these very tensors
    assert all(p is not q for p, q in zip(model.parameters(), old))
    error: Optional[str] = None
    try:
        step(model, opt, STEPS)
    except RuntimeError as e:
        error = str(e)
    assert_exact(values(model), sd, f"{kind}: the model after a step of the optimizer of its old parameters")
    again = OPTIMIZERS[kind](model.parameters())
    step(model, again, STEPS + 1)
    now = values(model)
    assert all(not torch.equal(now[k], sd[k]) for k in sd), f"{kind}: a new optimizer did not train the model"
    return dict(error=error)


def compare_assign(plain_: Dict[str, Any], tsam_: Dict[str, Any]) -> None:
    assert plain_["error"] is None, plain_["error"]
    message = tsam_["error"]
    if message is not None:
        assert "assign=True" in message or "replaced" in message, message
        assert "construct TSAM" in message, message  # and the remedy


# -- the table --------------------------------------------------------------------------------------------

def equal(plain_: Dict[str, Any], tsam_: Dict[str, Any]) -> None:
    assert tsam_ == plain_, f"TSAM: {tsam_}\nplain AdamW: {plain_}"


@dataclass(frozen=True)
class Row:
    id: str
    workflow: Callable[[str, Path], Dict[str, Any]]
    needs: Tuple[str, ...] = ()
    compare: Callable[[Dict[str, Any], Dict[str, Any]], None] = equal

    def param(self):
        return pytest.param(self, id=self.id)


ROWS = (
    Row("accelerate-save-state", accelerate_save_state, ("accelerate", "safetensors")),
    Row("accelerate-save-model-sharded", accelerate_save_model, ("accelerate", "safetensors")),
    Row("accelerate-save-model-bin-sharded", accelerate_save_model_bin, ("accelerate",), compare_bin_shards),
    Row("safetensors-save-model", safetensors_save_model, ("safetensors",)),
    Row("hub-save-torch-model", hub_save_torch_model, ("huggingface_hub", "safetensors")),
    Row("hf-save-pretrained-sharded", hf_save_pretrained, ("transformers", "safetensors")),
    Row("submodule-torch-save", submodule_torch_save, (), compare_bytes),
    Row("hogwild-share-memory", hogwild),
    Row("vector-to-parameters", vector_to_parameters_row),
    Row("load-state-dict-assign", assign_row, (), compare_assign),
)


@pytest.mark.parametrize("row", [r.param() for r in ROWS])
def test_a_workflow_ends_as_with_plain_adamw(row: Row, tmp_path):
    for package in row.needs:
        pytest.importorskip(package, reason=f"{package} is not installed (pip install -e '.[integrations]')")
    outcomes = {}
    for kind in ("plain", "tsam"):
        (tmp_path / kind).mkdir()
        outcomes[kind] = row.workflow(kind, tmp_path / kind)
    row.compare(outcomes["plain"], outcomes["tsam"])


def test_parameters_keep_their_own_storage():
    """After several TSAM steps every parameter has the data pointer and the storage it had before the
    first (never re-pointed), and no two parameters share a storage."""
    model = net()
    params = list(model.parameters())
    before = [(p.data_ptr(), p.untyped_storage().data_ptr()) for p in params]
    assert len({s for _, s in before}) == len(params)
    opt = tsam(params)
    train(model, opt, steps=4)
    after = [(p.data_ptr(), p.untyped_storage().data_ptr()) for p in params]
    names = [n for n, _ in model.named_parameters()]
    moved = [n for n, b, a in zip(names, before, after) if b != a]
    assert not moved, f"re-pointed: {moved}"
    assert len({s for _, s in after}) == len(params), "parameters share a storage"
    assert all(p.grad is None or p.grad.untyped_storage().data_ptr() not in {s for _, s in after} for p in params)


# -- checkpoints taken inside a step ----------------------------------------------------------------------

MID_STEP = positions(_CONFIGS["ascent"], _CONFIGS["hmc"], _CONFIGS["ascent-shared-adaptive"])


def _preempted_step(config, position: int, loop: bool, handler, before: Optional[dict] = None,
                    after_forward: bool = False):
    """Two steps of ``frozen-net-bf16`` (mixed dtypes, a frozen layer); during the second step's evaluation
    ``position`` a real SIGUSR1 is delivered to this process and ``handler(model, opt)`` runs in it, as a
    preemption handler (Lightning's SLURM requeue, torchelastic's SIGTERM) would."""
    toy = TOYS["frozen-net-bf16"]
    model = toy.model()
    opt = config.build(model, lr=0.1, radius=0.05, seed=3)
    x, y = toy.batch()
    out = {}
    previous = signal.signal(signal.SIGUSR1, lambda *_: out.update(handler(model, opt) or {}))
    try:
        for step in range(2):
            if step == 1:
                out["theta0"] = [p.detach().clone() for p in model.parameters()]
                if before is not None:
                    before["state_dict"] = copy.deepcopy(opt.state_dict())

            def evaluate():
                signal_here = step == 1 and opt.closure_index == position
                if signal_here and not after_forward:
                    os.kill(os.getpid(), signal.SIGUSR1)  # delivered before the next bytecode: mid-evaluation
                loss = toy.loss(model(x), y)
                if signal_here and after_forward:  # the forward saved the parameters for its backward
                    os.kill(os.getpid(), signal.SIGUSR1)
                loss.backward()
                return loss
            one_step(opt, evaluate, loop)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    return model, opt, out


def _save_unperturbed(model, opt):
    with opt.unperturbed():
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
        inner = [p.detach().clone() for p in model.parameters()]
    return {"file": buffer.getvalue(), "inside": inner, "after": [p.detach().clone() for p in model.parameters()]}


@pytest.mark.parametrize("after_forward", [False, True], ids=["before-forward", "before-backward"])
@pytest.mark.parametrize("loop", [False, True], ids=["closure", "loop"])
@pytest.mark.parametrize("config, position", MID_STEP)
def test_a_signal_handler_saves_theta0_and_the_step_goes_on(config, position, loop, after_forward):
    """A checkpoint written by a signal handler inside ``opt.unperturbed()`` holds theta0 and the optimizer
    state of theta0 (loads into a fresh model and optimizer exactly), and the interrupted step ends bit for
    bit where an uninterrupted one does -- also when the signal lands between a forward and its backward."""
    model, opt, out = _preempted_step(config, position, loop, _save_unperturbed, after_forward=after_forward)
    clean, clean_opt, _ = _preempted_step(config, -1, loop, lambda *_: None)
    for a, b in zip(model.parameters(), clean.parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["tsam"] == clean_opt.state_dict()["tsam"]
    for inside, theta0 in zip(out["inside"], out["theta0"]):
        assert torch.equal(inside, theta0)
    at_origin = opt.config.plan[position].role == "origin"  # the evaluation at theta0 itself
    assert at_origin != any(not torch.equal(a, t) for a, t in zip(out["after"], out["theta0"])), \
        "the parameters after the handler are not the evaluation's point"
    saved = torch.load(io.BytesIO(out["file"]), weights_only=True)
    for (name, value), theta0 in zip(((n, v) for n, v in saved["model"].items()), out["theta0"]):
        assert torch.equal(value, theta0), name
    fresh = TOYS["frozen-net-bf16"].model()
    fresh.load_state_dict(saved["model"])
    fresh_opt = config.build(fresh, lr=0.1, radius=0.05, seed=3)
    fresh_opt.load_state_dict(saved["opt"])
    assert fresh_opt.step_count == 1


def test_state_dict_inside_a_step_is_theta0s():
    """``opt.state_dict()`` at a perturbed point: the state as of theta0 (a step changes it only when it
    finishes), the same inside ``opt.unperturbed()`` and out, and the same as before the step began."""
    def handler(model, opt):
        bare = copy.deepcopy(opt.state_dict())
        with opt.unperturbed():
            inside = copy.deepcopy(opt.state_dict())
        return {"bare": bare, "inside": inside}
    config = _CONFIGS["ascent"]
    before = {}
    model, opt, out = _preempted_step(config, 1, False, handler, before)
    assert out["bare"]["tsam"]["step"] == out["inside"]["tsam"]["step"] == 1
    assert_same(out["bare"], out["inside"])
    assert_same(out["bare"], before["state_dict"])


def test_unperturbed_outside_a_step_does_nothing():
    toy = TOYS["tiny-mlp"]
    model = toy.model()
    opt = _CONFIGS["ascent"].build(model, lr=0.1)
    opt.step(toy.closure(model))
    before = [p.detach().clone() for p in model.parameters()]
    with opt.unperturbed():
        pass
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("policy", ["once_per_step", "per_sample"])
def test_unperturbed_puts_batch_norm_statistics_back_as_the_step_began(policy):
    """With a batch-norm policy installed, the running statistics inside ``unperturbed()`` are those the
    step began with (a checkpoint taken there and resumed redoes the step exactly), and the step then ends
    bit for bit as one without the block."""
    from tsam_fast import bn_running_stats
    x = torch.randn(16, 4)

    def run(block: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
        opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, num_samples=2, seed=1)
        bn_running_stats(model, opt, policy)
        seen = {}
        for step in range(2):
            start = {k: v.clone() for k, v in model.state_dict().items()}

            def closure():
                if block and step == 1 and opt.closure_index == 3:  # three forwards of this step so far
                    before = {k: v.clone() for k, v in model.state_dict().items()}
                    with opt.unperturbed():
                        seen["inside"] = {k: v.clone() for k, v in model.state_dict().items()}
                    seen["after"] = {k: v.clone() for k, v in model.state_dict().items()}
                    seen.update(start=start, before=before)
                loss = model(x).square().mean()
                loss.backward()
                return loss
            opt.step(closure)
        return model.state_dict(), seen

    clean, _ = run(False)
    final, seen = run(True)
    assert_same(final, clean)
    assert_same(seen["inside"], seen["start"])  # parameters at theta0 and statistics as the step began
    assert_same(seen["after"], seen["before"])
    assert not torch.equal(seen["before"]["1.running_mean"], seen["start"]["1.running_mean"])
