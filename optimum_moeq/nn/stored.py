"""Base of the replacement modules: stored quantization tensors keep their dtype under casts."""

from __future__ import annotations

import torch
from torch import nn


class QuantizedModule(nn.Module):
    """Codes, scales, zeros and absmax keep their dtype under ``model.to(dtype)``, ``.half()`` or
    ``.bfloat16()``; only their device follows. The codes were chosen against those exact float16
    (or float32) values: casting them would silently change the weights, and save them that way.
    The bias and the full-precision placeholders (named after ``projection_shapes``) cast as usual."""

    projection_shapes: dict[str, tuple[int, int]]

    def _apply(self, fn, recurse=True):
        stored = {
            id(param)
            for name, param in self._parameters.items()
            if param is not None and name != "bias" and name not in self.projection_shapes
        }

        def keep_dtype(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in stored:
                return fn(tensor)
            target = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))  # where fn sends such a tensor
            return fn(tensor) if target.dtype == tensor.dtype else tensor.to(device=target.device)

        return super()._apply(keep_dtype, recurse)
