"""Estimate PeakNet's GPU memory for inference without a GPU: a forward on the ``meta`` device.

    .venv/bin/python benchmarks/memory_estimate.py --model peaknet-673m --shape 352,384 \\
        --batch 1,2,4,8,16 --dtype bf16

A ``TorchDispatchMode`` sees every aten op of the forward; it counts the bytes of each op's output
(views and in-place results share their input's storage and are not counted again) and frees
them when the last tensor using that storage is gone, so the peak is that of the live tensors of
a real eager forward under ``torch.inference_mode``. ``--dtype bf16``/``fp16`` emulates CUDA
autocast as the pipeline uses it: convolutions and matmuls cast their inputs to the low precision
(weights once, kept in autocast's cache for the forward; activations per op, freed after it),
LayerNorm / GroupNorm run in fp32, everything else keeps its input's type.

Not counted: the CUDA context (about 0.3-0.6 GB per process), cuDNN/cuBLAS workspaces, the
caching allocator's rounding and fragmentation, and the pipeline's own frame buffers. Treat the
result as a lower bound; measure on the GPU (``torch.cuda.max_memory_allocated``) before sizing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peaknet_pva.model import create_model  # noqa: E402

log = logging.getLogger("memory_estimate")

aten = torch.ops.aten
#: Ops CUDA autocast runs in the low precision (at the aten level the tracker sees).
#: Under inference_mode the composite ops (conv2d, linear, layer_norm, ...) reach the mode
#: undecomposed, as they reach autocast; their decompositions are listed too.
LOW_PRECISION_OPS = {
    aten.conv2d.default, aten.conv_transpose2d.input, aten.linear.default,
    aten.convolution.default, aten.mm.default, aten.addmm.default, aten.bmm.default,
    aten.matmul.default,
}  # fmt: skip
#: Ops CUDA autocast runs in fp32.
FP32_OPS = {
    aten.layer_norm.default, aten.group_norm.default,
    aten.native_layer_norm.default, aten.native_group_norm.default,
}  # fmt: skip
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _Token:
    """Stands for one storage; the tracker frees its bytes when the token is collected."""


class LiveBytes(TorchDispatchMode):
    """Track the live and peak bytes of tensors created by ops (parameters not included)."""

    def __init__(self, low: torch.dtype | None = None) -> None:
        super().__init__()
        self.low = low
        self.live = 0  # activations (and per-op cast copies)
        self.weight_cache = 0  # autocast's cast copies of the weights, held for the forward
        self.peak = 0  # of live + weight_cache
        self.peak_activations = 0  # of live alone
        self._cached: set[int] = set()

    def _alloc(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak_activations = max(self.peak_activations, self.live)
        self.peak = max(self.peak, self.live + self.weight_cache)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def track(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage as live until the last tensor holding it is collected."""
        nbytes = t.untyped_storage().nbytes()
        token = _Token()
        t._mem_token = token  # type: ignore[attr-defined]
        weakref.finalize(token, self._free, nbytes)
        self._alloc(nbytes)

    def _cast(self, x: Any, dtype: torch.dtype, temporaries: list[int]) -> Any:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == dtype:
            return x
        nbytes = x.numel() * dtype.itemsize
        if isinstance(x, torch.nn.Parameter):
            if id(x) not in self._cached:  # autocast keeps one cast copy per weight
                self._cached.add(id(x))
                self.weight_cache += nbytes
                self.peak = max(self.peak, self.live + self.weight_cache)
        else:
            temporaries.append(nbytes)
            self._alloc(nbytes)
        return x.to(dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        temporaries: list[int] = []
        if self.low is not None and func in LOW_PRECISION_OPS:
            args, kwargs = tree_map(lambda x: self._cast(x, self.low, temporaries), (args, kwargs))
        elif self.low is not None and func in FP32_OPS:
            args, kwargs = tree_map(
                lambda x: self._cast(x, torch.float32, temporaries), (args, kwargs)
            )
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        for o in outs:
            if not isinstance(o, torch.Tensor):
                continue
            base = next((a for a in inputs if torch._C._is_alias_of(o, a)), None)
            if base is None:
                self.track(o)
            elif o is not base and hasattr(base, "_mem_token"):
                # A view (or ``to`` that changed nothing): keep the base's storage alive.
                o._mem_token = base._mem_token  # type: ignore[attr-defined]
        for nbytes in temporaries:
            self._free(nbytes)
        return out


def estimate(model_name: str, shape: tuple[int, int], batch: int, dtype: str) -> dict[str, Any]:
    with torch.device("meta"):
        model = create_model(model_name).eval()
        x = torch.empty(batch, model.config.in_chans, *shape)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    tracker = LiveBytes(LOW.get(dtype))
    tracker.track(x)
    with torch.inference_mode(), tracker:
        y = model(x)
    del y
    gib = 1024**3
    return {
        "model": model_name, "shape": list(shape), "batch": batch, "dtype": dtype,
        "weights_gib": round(weights / gib, 3),
        "autocast_weight_cache_gib": round(tracker.weight_cache / gib, 3),
        "peak_activations_gib": round(tracker.peak_activations / gib, 3),
        "total_gib": round((weights + tracker.peak) / gib, 3),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="peaknet-673m")
    parser.add_argument("--shape", default="352,384", help="H,W of one model input (multiples of 32)")
    parser.add_argument("--batch", default="1,2,4,8,16", help="comma-separated model batch sizes")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shape = tuple(int(v) for v in args.shape.split(","))
    for b in (int(v) for v in args.batch.split(",")):
        log.info(json.dumps(estimate(args.model, shape, b, args.dtype)))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
