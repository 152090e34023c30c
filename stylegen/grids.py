"""Result grids: one row per validation pair, columns content | style | output.

The original project saved ``image_at_epoch_XXXX.png`` each epoch; we keep that habit
with ``samples/epoch_XXXX.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stylegen.images import save_png


def grid_array(columns: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """columns: each (N, H, W, 3) uint8 -> one (N*(H+pad)+pad, K*(W+pad)+pad, 3) uint8 image."""
    n, h, w, _ = columns[0].shape
    k = len(columns)
    canvas = np.full((n * (h + pad) + pad, k * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for j, col in enumerate(columns):
        for i in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = col[i]
    return canvas


def to_hwc_uint8(t) -> np.ndarray:
    """(N, 3, H, W) tensor, float in [0, 1] or uint8 -> (N, H, W, 3) uint8."""
    import torch

    if t.dtype != torch.uint8:
        t = (t.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return t.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(path: str | Path, content, style, output) -> Path:
    """content/style/output: (N, 3, H, W) tensors -> PNG rows of content | style | output."""
    import torch

    canvas = grid_array([to_hwc_uint8(content), to_hwc_uint8(style), to_hwc_uint8(output)])
    return save_png(path, torch.from_numpy(canvas).permute(2, 0, 1))
