"""LoRA dropout with masks that cost less to draw on a CPU: same distribution, a quarter of the random draws.

PEFT gives every LoRA module an nn.Dropout, which draws one random number per element of the module's input. On a
CPU that draw is slow: in a bf16 training step of the default model (30 layers, q/k/v each with its own dropout)
the masks were 11% of the step (torch.profiler, aten::bernoulli_). Here each 64-bit draw gives four 16-bit
uniform numbers, each compared with p: an element is dropped with probability round(p * 65536) / 65536, which
is p to within 1e-5. No library offers this; on a GPU, where drawing is cheap, PEFT's own dropout is kept.
"""

from __future__ import annotations

import torch
from torch import nn

_SPAN = 1 << 16


class QuarterDrawDropout(nn.Module):
    """nn.Dropout(p), its keep-mask made from 16-bit slices of 64-bit random integers."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        # An element is kept when its 16-bit number (-32768..32767) is at least this.
        self.threshold = -(_SPAN // 2) + round(p * _SPAN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        draws = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        keep = draws.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_on_cpu(model, device: torch.device) -> int:
    """Swap every LoRA module's nn.Dropout for QuarterDrawDropout when `device`, where the model trains, is a CPU;
    returns how many."""
    if torch.device(device).type != "cpu":
        return 0
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                dropouts[name] = QuarterDrawDropout(dropout.p)
                swapped += 1
    return swapped
