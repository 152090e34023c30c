"""Checkpoint files: atomic writes, ``weights_only`` loads, clear errors.

A checkpoint is one ``torch.save`` file (``checkpoint.pt``) holding plain tensors and
Python scalars only, so ``torch.load(weights_only=True)`` reads it and a pickle
payload disguised as a checkpoint is refused:

    {"format": "stylegen-checkpoint-v1", "step": int, "config": {section: {key: value}},
     "generator": state_dict, "discriminator": state_dict | None,
     "opt_g": state_dict, "opt_d": state_dict | None, "metrics": {name: float}}
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any

from stylegen import storage
from stylegen.config import ConfigError, from_dict
from stylegen.errors import UserError

FORMAT = "stylegen-checkpoint-v1"
FILENAME = "checkpoint.pt"
STEP_FILE = re.compile(r"^/(checkpoints/)?step_\d+/checkpoint\.pt$")
log = logging.getLogger(__name__)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically save ``state`` (see module doc) to ``path`` (a file, or a dir -> dir/checkpoint.pt)."""
    import torch

    path = Path(path)
    if path.suffix != ".pt":
        path = path / FILENAME
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    storage.write_bytes(path, buf.getvalue())
    return path


def resolve_checkpoint_path(path: str | Path) -> str:
    """A checkpoint file, a dir holding ``checkpoint.pt`` (a Ray checkpoint dir or an export), or a
    run dir (its newest ``step_XXXXXXXX/checkpoint.pt``: ``checkpoints/step_*`` of a ``--local`` run,
    ``step_*`` of a Ray run); local or on object storage (``s3://...``). Returns the file's path/URL."""
    if storage.is_remote(path):
        url = str(path)
        try:
            if url.endswith(".pt") and storage.file_size(url) is not None:
                return url
            if storage.file_size(storage.join(url, FILENAME)) is not None:
                return storage.join(url, FILENAME)
            steps = sorted((u for u in storage.list_files(url, FILENAME, recursive=True)
                            if STEP_FILE.search(u[len(url):])), key=lambda u: u.rsplit("/step_", 1)[1])
        except OSError as e:
            raise UserError(f"checkpoint {storage.explain(e, url)}") from None
        if not steps:
            raise UserError(f"checkpoint {url!r} not found; pass a checkpoint.pt object or a prefix holding one")
        return steps[-1]
    p = Path(path)
    if p.is_dir():
        steps = sorted([*p.glob(f"checkpoints/step_*/{FILENAME}"), *p.glob(f"step_*/{FILENAME}")],
                       key=lambda f: f.parent.name)
        p = steps[-1] if not (p / FILENAME).exists() and steps else p / FILENAME
    if p.exists() and not p.is_file():  # a FIFO would block the read, a device never ends
        raise UserError(f"checkpoint {str(p)!r} is not a regular file (a FIFO, device, socket or dir); "
                        "pass a checkpoint.pt file or a directory holding one")
    if not p.is_file():
        raise UserError(f"checkpoint {str(path)!r} not found; pass a checkpoint.pt file or a directory holding one")
    return str(p)


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``; anything else than a stylegen checkpoint is a UserError."""
    p = resolve_checkpoint_path(path)
    try:
        data = storage.read_bytes(p)
    except OSError as e:
        raise UserError(f"checkpoint {storage.explain(e, p)}") from None
    return load_checkpoint_bytes(data, p, map_location)


def load_checkpoint_bytes(data: bytes, p: str, map_location: str = "cpu") -> dict[str, Any]:
    """``load_checkpoint`` of bytes already read from ``p`` (named in errors)."""
    import pickle

    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours its message
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if not found:
            raise UserError(f"checkpoint {str(p)!r} is corrupt or not a checkpoint (unreadable pickle data); "
                            "use a checkpoint.pt written by stylegen train or stylegen best --export") from None
        what = f"it references {found.group(1)}"
        raise UserError(f"checkpoint {str(p)!r} was refused by the safe loader (weights_only=True): {what}; "
                        "only stylegen checkpoints (plain tensors) are loaded") from None
    except Exception as e:  # truncated zip, random bytes, ...
        raise UserError(f"checkpoint {str(p)!r} is corrupt or not a checkpoint ({type(e).__name__}); "
                        "use a checkpoint.pt written by stylegen train or stylegen best --export") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"checkpoint {str(p)!r} is not a stylegen checkpoint (no format {FORMAT!r}); "
                        "train one with `stylegen train` or export one with `stylegen best --export`")
    return state


# ----------------------------------------------------------------------------- run layout and models

STEP_DIR = re.compile(r"^step_(\d{8})$")


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """step_XXXXXXXX dirs, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def generator_from_state(state: dict, name: str):
    """A loaded checkpoint dict -> (Generator on CPU in eval mode, its Config); ``name`` is for errors."""
    from stylegen.models.generator import build_generator  # lazy: torch; not for `stylegen best`

    p = name
    if not isinstance(state.get("config"), dict) or not isinstance(state.get("generator"), dict):
        raise UserError(f"checkpoint {p!r} lacks its config or generator weights; "
                        "pass a checkpoint written by `stylegen train` or `stylegen best --export`")
    try:
        cfg = from_dict(state["config"])
    except ConfigError as e:
        raise UserError(f"checkpoint {p!r} holds a config this stylegen cannot read ({e}); "
                        "it was written by another stylegen version") from None
    gen = build_generator(cfg)
    problem = state_dict_mismatch(gen.state_dict(), state["generator"])
    if not problem:
        try:
            gen.load_state_dict(state["generator"], strict=True)
        except (RuntimeError, TypeError, AttributeError) as e:
            problem = " ".join(str(e).split())[:160]
    if problem:
        m = cfg.model
        raise UserError(f"checkpoint {p!r}: its generator weights do not fit its model config "
                        f"(fusion={m.fusion}, channels={m.channels}, res_blocks={m.res_blocks}, "
                        f"adain_levels={m.adain_levels}): {problem}; it was saved from another model "
                        "config or version") from None
    log.debug("loaded generator from %s (step %s, %s)", p, state.get("step"), cfg.model)
    return gen.eval(), cfg


def state_dict_mismatch(expected: dict, got: dict) -> str:
    """'' when ``got`` has exactly ``expected``'s keys and shapes, else a short description."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [k for k in expected if k in got and tuple(getattr(got[k], "shape", ())) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape (first {k}: {tuple(getattr(got[k], 'shape', ()))} "
                     f"where the config needs {tuple(expected[k].shape)})")
    return ", ".join(parts)
