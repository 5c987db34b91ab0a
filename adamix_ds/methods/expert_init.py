"""How a stack of experts (E, ...) starts: every expert drawn on its own, or one draw copied into all of them.

The AdaMix reference builds one module and deep-copies it into every expert, so its experts start identical and
differ only through the routes that train them; independent draws are the other choice (--expert_init).
"""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def init_stack_(stack: torch.Tensor, draw: Callable[[torch.Tensor], object], identical: bool) -> None:
    """Fill `stack` (E, ...) in place: draw(expert) for each expert, or for the first one only and copy it."""
    for expert in stack[:1] if identical else stack:
        draw(expert)
    if identical:
        stack[1:] = stack[0]
