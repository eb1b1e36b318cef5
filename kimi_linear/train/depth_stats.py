"""Training dynamics over depth: per decoder layer, the RMS of the hidden state it reads and the norm of its
parameters' gradient — what the Attention Residuals paper plots (the standard residual's magnitudes grow with depth
and its gradients concentrate in early layers; AttnRes keeps both even).

The hidden state of layer i is its attention sublayer's input before the pre-norm: the running sum for the standard
residual, the depth read for AttnRes. It is captured by a forward hook on ``input_layernorm`` (the model is not
touched), as a detached scalar per layer, and read on the host only when a log line is written.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kimi_linear.train.distributed import local_grad


class DepthProbe:
    def __init__(self, model: nn.Module) -> None:
        self.layers = list(model.model.layers)
        self._rms: list[torch.Tensor | None] = [None] * len(self.layers)
        for i, layer in enumerate(self.layers):
            layer.input_layernorm.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self._rms[i] = inputs[0].detach().float().pow(2).mean().sqrt()
        return record

    def hidden_rms(self) -> list[float]:
        """RMS of each layer's input in the last forward (this rank's tokens; the mean over ranks)."""
        seen = [r for r in self._rms if r is not None]
        rms = torch.stack([r if r is not None else torch.zeros((), device=seen[0].device) for r in self._rms])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(rms)
            rms /= dist.get_world_size()
        return rms.tolist()

    def grad_norms(self) -> list[float]:
        """Norm of each layer's gradient (call before clipping). Every parameter here is either whole on one rank
        or sharded across ranks (FSDP, expert parallel), so squared norms add over ranks."""
        device = next(iter(self.layers[0].parameters())).device
        squares = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        for i, layer in enumerate(self.layers):
            for p in layer.parameters():
                if p.grad is not None:
                    squares[i] += local_grad(p).double().pow(2).sum()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(squares)
        return squares.sqrt().tolist()
