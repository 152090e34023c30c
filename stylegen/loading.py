"""What a user's ``--checkpoint`` names -> a generator in eval mode (``stylize``, ``export``, ``serve``).

None is the model shipped in the package; anything else is what ``best.resolve_model`` takes: a
checkpoint file, a dir holding one, a run dir (its newest) or a sweep dir (its best trial).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import TYPE_CHECKING

from stylegen.best import resolve_model
from stylegen.checkpoint import generator_from_state, load_checkpoint
from stylegen.errors import UserError

if TYPE_CHECKING:
    import torch

    from stylegen.config import Config
    from stylegen.models.generator import Generator

PRETRAINED = "assets/pretrained.pt"


def shipped_checkpoint() -> Path:
    """Path of the pretrained model inside the package, or a UserError when it is not shipped."""
    res = importlib.resources.files("stylegen").joinpath(PRETRAINED)
    if not res.is_file():
        raise UserError("no --checkpoint given and no shipped model found (stylegen/assets/pretrained.pt); "
                        "pass --checkpoint CKPT (a checkpoint.pt from `stylegen train` or `stylegen best --export`)")
    return Path(str(res))  # the package is installed from files (setuptools package-data), not a zip


def load_generator(path: str | Path | None, device: str | torch.device = "cpu") -> tuple[Generator, Config]:
    """Rebuild the generator from a checkpoint's own config and load its weights (strict), in eval mode.

    ``path`` None = the shipped pretrained model; else anything ``resolve_model`` takes (a
    checkpoint, run or sweep). Raises UserError for a missing file, a file that is not a
    stylegen checkpoint (random bytes, pickle payloads: loaded with weights_only=True), an
    unreadable config, or weights that do not fit the config.
    """
    p = shipped_checkpoint() if path is None else resolve_model(path)[0]
    gen, cfg = generator_from_state(load_checkpoint(p, map_location="cpu"), str(p))
    return gen.to(device).eval(), cfg
