"""Blocks streamed from host memory, for GPUs smaller than the model: a VRAM budget keeps the small parts and as
many blocks as fit on the device, and the rest in pinned host memory, each copied over just before it runs and
dropped after it, `ahead` blocks in advance on a side stream so the copy hides behind the compute before it.

The transformer streams its refiners and layers, the text encoder its decoder layers. Inside ComfyUI the host's
own partial loading does this with the same layers; this is for the CLI and the library. On a CPU the copies are
plain copies (nothing to gain, but the same bookkeeping, which the tests check there).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

GB = 2**30


def block_lists(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer, ControlNet or text encoder, in the order a forward runs them."""
    inner = getattr(model, "model", model)  # the text encoder's Qwen3
    names = ("noise_refiner", "context_refiner", "siglip_refiner", "layers")
    return [block for name in names for block in getattr(inner, name, ())]


def tensors(block: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """Where every parameter and buffer of `block` hangs: (module, "_parameters" or "_buffers", name)."""
    return [(m, kind, name) for m in block.modules() for kind in ("_parameters", "_buffers")
            for name, t in getattr(m, kind).items() if t is not None]  # fmt: skip


def nbytes(items: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in items)


class Streamer:
    """Streams `blocks` of `model` onto `device` within `budget` bytes (everything else resident), prefetching
    `ahead` blocks. `peak` is the most bytes it has held on the device at once."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], device, budget: int, ahead: int = 1):
        self.device, self.ahead = torch.device(device), max(1, ahead)
        self.cuda = self.device.type == "cuda"
        in_blocks = {id(t) for b in blocks for t in (*b.parameters(), *b.buffers())}
        rest = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in in_blocks]
        sizes = [nbytes(getattr(m, kind)[name] for m, kind, name in tensors(b)) for b in blocks]
        fixed, window = nbytes(rest), (self.ahead + 1) * max(sizes, default=0)
        if budget < fixed + window:
            raise ValueError(f"a VRAM budget of {budget / GB:.3g} GB is below what streaming this model needs: "
                             f"{fixed / GB:.3g} GB for its other parts and {window / GB:.3g} GB for "
                             f"{self.ahead + 1} blocks in flight")  # fmt: skip
        resident, spent = [], fixed + window
        for block, size in zip(blocks, sizes):
            if spent + size > budget:
                break
            resident.append(block)
            spent += size
        for t in rest:
            t.data = t.data.to(self.device)
        for block in resident:
            block.to(self.device)
        self.streamed = [b for b in blocks if all(b is not r for r in resident)]
        self.home = {id(b): self.pinned(b) for b in self.streamed}
        self.size = dict(zip(map(id, blocks), sizes))
        self.held = self.peak = fixed + sum(self.size[id(b)] for b in resident)
        self.flight: dict[int, tuple] = {}  # block -> (device copies, the copy's event)
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.log: list[tuple[str, int]] = []  # ("copy" | "run" | "drop", index in `streamed`), for the tests
        self.hooks = []
        for i, block in enumerate(self.streamed):
            self.hooks.append(block.register_forward_pre_hook(lambda m, args, i=i: self.enter(i)))
            self.hooks.append(block.register_forward_hook(lambda m, args, out, i=i: self.leave(i)))

    def pinned(self, block: nn.Module) -> list[torch.Tensor]:
        """The block's tensors in host memory (page-locked where they go to a GPU, so copies are asynchronous)."""
        out = []
        for m, kind, name in tensors(block):
            t = getattr(m, kind)[name].data.to("cpu")
            out.append(t.pin_memory() if self.cuda else t)
        for (m, kind, name), t in zip(tensors(block), out):
            self.place(m, kind, name, t)
        return out

    @staticmethod
    def place(module: nn.Module, kind: str, name: str, t: torch.Tensor):
        if kind == "_parameters":
            module._parameters[name].data = t
        else:
            module._buffers[name] = t

    def fetch(self, i: int):
        """Start copying streamed block `i` to the device (on the side stream where there is one)."""
        i %= len(self.streamed)
        block = self.streamed[i]
        if id(block) in self.flight:
            return
        self.log.append(("copy", i))
        if self.cuda:
            self.side.wait_stream(torch.cuda.current_stream(self.device))  # the memory it reuses is free
            with torch.cuda.stream(self.side):
                copies = [t.to(self.device, non_blocking=True) for t in self.home[id(block)]]
                event = torch.cuda.Event()
                event.record(self.side)
        else:
            copies, event = [t.clone() for t in self.home[id(block)]], None
        self.flight[id(block)] = (copies, event)
        self.held += self.size[id(block)]
        self.peak = max(self.peak, self.held)

    def enter(self, i: int):
        self.fetch(i)
        block = self.streamed[i]
        copies, event = self.flight[id(block)]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        for (m, kind, name), t in zip(tensors(block), copies):
            self.place(m, kind, name, t)
        self.log.append(("run", i))
        for j in range(1, self.ahead + 1):  # the next ones copy while this one computes (wrapping to the start)
            self.fetch(i + j)

    def leave(self, i: int):
        block = self.streamed[i]
        copies, _ = self.flight.pop(id(block))
        if self.cuda:  # the compute stream may still read them: the allocator waits for it before reuse
            for t in copies:
                t.record_stream(torch.cuda.current_stream(self.device))
        for (m, kind, name), t in zip(tensors(block), self.home[id(block)]):
            self.place(m, kind, name, t)
        self.held -= self.size[id(block)]
        self.log.append(("drop", i))

    def close(self):
        """Remove the hooks and let the blocks stay where they were left: in host memory."""
        for hook in self.hooks:
            hook.remove()
        self.flight.clear()


def stream(model: nn.Module, device, budget_gb: float, ahead: int = 1) -> nn.Module:
    """`model` (on the CPU) set to run on `device` within `budget_gb` of device memory for its weights: all of
    it moved there if it fits, else its blocks streamed (`model.streamer`)."""
    blocks = block_lists(model)
    total = nbytes((*model.parameters(), *model.buffers()))
    if budget_gb * GB >= total or not blocks:
        return model.to(device)
    model.streamer = Streamer(model, blocks, device, int(budget_gb * GB), ahead)
    return model
