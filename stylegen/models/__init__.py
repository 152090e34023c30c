"""The networks (``generator.py``, ``discriminator.py``) and what callers need to use one that DDP may wrap."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def unwrap(module: nn.Module | None) -> nn.Module | None:
    """The bare module inside a DDP wrapper and/or torch.compile's wrapper (state dicts, no-sync forwards,
    attribute reads use it; a compiled module's state dict keys carry an ``_orig_mod.`` prefix)."""
    module = getattr(module, "module", module)   # DDP
    return getattr(module, "_orig_mod", module)  # torch.compile


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
