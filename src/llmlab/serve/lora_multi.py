"""Several LoRA adapters on one base model at once, chosen per batch row (for serving).

`llmlab.methods.lora.LoRALinear` holds one adapter and trains it; a server wants N adapters in memory and a
batch whose rows each use a different one (or none). `MultiLoRA` wraps every projection some adapter targets in
a `MultiLoRALinear`, which keeps per adapter one A (all its targets' A's stacked: sum of ranks x in) and one B
(out x sum of ranks, each target's B in its slice of the output rows, zeros elsewhere, scale folded in). Before a
forward, `select(["a", None, "b", "a"])` names each row's adapter; each module then adds, per adapter present,
`x[rows] A^T B^T` into those rows (rows of the base model get nothing). The cost is one pair of small matmuls per
distinct adapter in the batch, not per row, and no weight is copied per step.

Adapters are read with `llmlab.methods.lora.read_adapter` and checked against the base model with
`llmlab.methods.adapters.check_base`, so what `llmlab finetune --method lora` or PEFT writes serves as is. The base
weights are never changed, and may be quantized (a GGUF's blocks, `llmlab.quantized`): the updates are computed in
the activations' dtype beside the base's own product, never merged into it. Loading is two steps, `stage` (read and
check the files, build the matrices: slow, changes nothing) and `install` (put them in place: quick), so a server
loads an adapter while it runs and pauses only for the second; `remove` takes one out (and puts a projection no
adapter targets any more back as the layer it was).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.errors import LLMLabError
from llmlab.methods.adapters import BOTTLENECK, adapter_kind, check_base
from llmlab.methods.lora import lora_scale, read_adapter, target_rows


class MultiLoRALinear(nn.Module):
    """A linear layer (nn.Linear, or a quantized `QuantLinear` / `FusedQuantLinear` kept in its blocks) plus any number
    of named LoRA updates, applied to the rows `groups` assigns them."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.A: dict[str, Tensor] = {}  # name -> (sum of ranks, in)
        self.B: dict[str, Tensor] = {}  # name -> (out, sum of ranks), scale folded in
        self.groups: list[tuple[str, Tensor | None]] = []  # (adapter, its batch rows or None = every row)

    def add(self, name: str, A: Tensor, B: Tensor) -> None:
        self.A[name], self.B[name] = A, B

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        for name, rows in self.groups:
            A = self.A.get(name)
            if A is None:  # this adapter leaves this projection alone
                continue
            if rows is None:
                y = y + F.linear(F.linear(x, A), self.B[name])
            else:
                y = y.index_add(0, rows, F.linear(F.linear(x.index_select(0, rows), A), self.B[name]))
        return y


class MultiLoRA:
    """The adapters served beside a base model: load them by name, then `select` each batch row's adapter."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names: list[str] = []
        self.modules: dict[str, MultiLoRALinear] = {}  # module path -> wrapper

    def add(self, name: str, folder: str | Path) -> None:
        """Load the PEFT LoRA adapter of `folder` under `name` (checked against the base model)."""
        self.install(self.stage(name, folder))

    def stage(self, name: str, folder: str | Path) -> tuple[str, list[tuple[str, Tensor, Tensor]]]:
        """Read and check the adapter in `folder` and build its per-projection matrices, for `install`; the model
        is not touched (LLMLabError when the adapter does not fit it)."""
        if name in self.names:
            raise LLMLabError(f"--adapter: the name '{name}' is given twice")
        if adapter_kind(folder) == BOTTLENECK:
            raise LLMLabError(f"{folder}: bottleneck adapters (--method adapter) cannot be served per request; serve "
                              "LoRA adapters, or use `llmlab generate/chat --adapter` for this one")
        config, files = read_adapter(folder)
        check_base(self.model, files)
        tensors = files.tensors
        layers = self.model.model.layers
        per_module: dict[str, list[tuple[str, Tensor, Tensor]]] = {}
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            prefix, target = key.split(".lora_A.")
            b = tensors.get(f"{prefix}.lora_B.{target}")
            layer = int(prefix.split(".")[2])
            if b is None or layer >= len(layers):
                raise LLMLabError(f"{folder}: the adapter does not fit this model ({key} has no lora_B or names a "
                                  f"layer beyond the model's {len(layers)})")
            per_module.setdefault(prefix, []).append((target, a, b))
        staged = []
        dev, dt = self.model.device, self.model.dtype  # the activations' (a quantized base has no float weight)
        for path, parts in per_module.items():
            linear = self._base_linear(path)
            A = torch.cat([a for _, a, _ in parts]).to(dev, dt)
            B = torch.zeros(linear.out_features, A.shape[0], device=dev, dtype=dt)
            col = 0
            for target, a, b in parts:
                lo, hi = target_rows(self.model, target)
                if a.shape[1] != linear.in_features or b.shape != (hi - lo, a.shape[0]):
                    raise LLMLabError(f"{folder}: the adapter does not fit this model: {path} {target} has A "
                                      f"{tuple(a.shape)} and B {tuple(b.shape)}, expected A (r, {linear.in_features}) "
                                      f"and B ({hi - lo}, r)")
                r = a.shape[0]
                B[lo:hi, col:col + r] = b.to(dev, dt) * lora_scale(config.alpha, r, config.rslora)  # as LoRALinear
                col += a.shape[0]
            staged.append((path, A, B))
        return name, staged

    def install(self, staged: tuple[str, list[tuple[str, Tensor, Tensor]]]) -> None:
        """Serve an adapter `stage` prepared (a bad adapter failed there, leaving the model untouched)."""
        name, parts = staged
        if name in self.names:
            raise LLMLabError(f"--adapter: the name '{name}' is given twice")
        for path, A, B in parts:
            self._wrapper(path).add(name, A, B)
        self.names.append(name)

    def remove(self, name: str) -> None:
        """Stop serving adapter `name` and free its matrices (no batch may be using it)."""
        if name not in self.names:
            raise LLMLabError(f"unknown adapter '{name}'; loaded: {self.names}")
        for path, module in list(self.modules.items()):
            module.A.pop(name, None)
            module.B.pop(name, None)
            if not module.A:  # no adapter targets this projection any more
                parent, _, attr = path.rpartition(".")
                setattr(self.model.get_submodule(parent), attr, module.base)
                del self.modules[path]
        self.names.remove(name)

    def _base_linear(self, path: str) -> nn.Module:
        module = self.modules.get(path) or self.model.get_submodule(path)
        return module.base if isinstance(module, MultiLoRALinear) else module

    def _wrapper(self, path: str) -> MultiLoRALinear:
        if path not in self.modules:
            parent, _, attr = path.rpartition(".")
            wrapper = MultiLoRALinear(self.model.get_submodule(path))
            setattr(self.model.get_submodule(parent), attr, wrapper)
            self.modules[path] = wrapper
        return self.modules[path]

    @contextmanager
    def select(self, row_adapters: Sequence[str | None]) -> Iterator[None]:
        """Within the block, batch row i of every forward uses adapter `row_adapters[i]` (None: the base model)."""
        unknown = {a for a in row_adapters if a is not None and a not in self.names}
        if unknown:
            raise LLMLabError(f"unknown adapter(s) {sorted(unknown)}; loaded: {self.names}")
        groups: list[tuple[str, Tensor | None]] = []
        present = dict.fromkeys(a for a in row_adapters if a is not None)
        device = self.model.device
        for name in present:
            if all(a == name for a in row_adapters):
                groups.append((name, None))
            else:
                rows = [i for i, a in enumerate(row_adapters) if a == name]
                groups.append((name, torch.tensor(rows, device=device)))
        for m in self.modules.values():
            m.groups = groups
        try:
            yield
        finally:
            for m in self.modules.values():
                m.groups = []
