"""CUDA graphs for the step loop (`Speed(graphs=True)`, CLI `--cuda-graphs`): the transformer's plain forward is
captured once per input shape and caption lengths, then replayed, so a step's thousand-odd kernel launches cost one
(launches are what a forward at 512² or a small batch waits on; gpu-peers.md).

The first call of a shape runs eagerly (its result is that step's: nothing is computed twice, and the shape's
caches, RoPE tables and masks, are built outside the capture), then the same call is captured; later calls copy
their inputs into the graph's buffers and replay it. A graph reads the memory it was captured with, so an entry
holds what the forward reads from outside (the shape's layout), the weights must stay where they are (no streaming:
`Speed` refuses the two together) and a call with a ControlNet runs eagerly. A forward that cannot be captured
(one that copies from the host or reads a value back, as an attention package might) runs eagerly from then on,
after one warning. All graphs share one memory pool: the activations of one forward stay reserved, not one per shape.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from functools import cache
from typing import NamedTuple

import torch

Capture = Callable[[Callable, tuple], tuple[tuple, torch.Tensor, Callable[[], None]]]


class Entry(NamedTuple):
    inputs: tuple  # the graph's own input buffers, which each replay reads
    output: torch.Tensor  # the buffer each replay writes
    replay: Callable[[], None]
    keep: object  # tensors the graph reads that live outside it (the shape's layout), held while it lives


class Graphs:
    """The captured forwards of one model, the `size` most recently used kept."""

    def __init__(self, capture: Capture | None = None, size: int = 8):
        self.capture = capture or cuda_capture
        self.size = size
        self.entries: OrderedDict[tuple, Entry] = OrderedDict()
        self.eager: set[tuple] = set()  # keys whose capture failed

    def __call__(self, fn: Callable, inputs: tuple[torch.Tensor, ...], static: tuple, keep: object) -> torch.Tensor:
        """`fn(*inputs)`, from the graph of these input shapes and `static` (the call's other, Python arguments)."""
        key = (tuple((t.shape, t.dtype, t.device) for t in inputs), static)
        entry = self.entries.get(key)
        if entry is None:
            out = fn(*inputs)
            if key not in self.eager:
                self.record(key, fn, inputs, keep)
            return out
        self.entries.move_to_end(key)
        for buffer, given in zip(entry.inputs, inputs):
            buffer.copy_(given)
        entry.replay()
        return entry.output.clone()  # the next replay overwrites the buffer

    def record(self, key: tuple, fn: Callable, inputs: tuple, keep: object):
        try:
            self.entries[key] = Entry(*self.capture(fn, inputs), keep)
        except RuntimeError as e:
            self.eager.add(key)
            warnings.warn(f"CUDA graphs: this forward cannot be captured, it runs eagerly ({e})", stacklevel=3)
            return
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)


def cuda_capture(fn: Callable, inputs: tuple) -> tuple[tuple, torch.Tensor, Callable[[], None]]:
    """`fn` on copies of `inputs` captured into a CUDA graph in the shared pool: (buffers, output, replay).
    Inference only: nothing is recorded for autograd."""
    buffers = tuple(t.detach().clone() for t in inputs)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.no_grad(), torch.cuda.graph(graph, pool=shared_pool(inputs[0].device)):
        output = fn(*buffers)
    return buffers, output, graph.replay


@cache
def shared_pool(device: torch.device):
    return torch.cuda.graph_pool_handle()
