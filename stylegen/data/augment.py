"""Colour augmentation of training styles: one random affine colour map per image, pure numpy.

A style's palette is what a feed-forward model learns first; the same texture under another hue,
saturation or contrast is a new style for the loss (its VGG statistics move) at no cost of data.
Every operation used here is linear in RGB, so per image they compose into one 3x3 matrix and an
offset, applied in a single batched product (well under a millisecond per 16x64x64 batch):

- channel permutation (probability ``strength / 2``; odd ones mirror the hue circle)
- hue rotation by up to +-180 deg x strength: a rotation of the chroma plane (I, Q) in YIQ space
- saturation x 2**u, u in +-strength: a scale of that plane
- contrast x 1.5**u about the image's mean colour, and a brightness shift of up to +-0.1 x strength
- a tint: a shift in the chroma plane of up to 0.12 x strength (of the 0-255 range), so that grey
  styles (brick, gravel, the relief), which hue and saturation leave grey, change colour too

``jitter_colors(batch, rng, strength)`` returns a new batch; the input is not modified. The loader
seeds ``rng`` by the style stream's position, so it is deterministic and a resumed run repeats it
(stylegen/data/loader.py); it is applied to training styles only, never to val or eval pairs.
"""

from __future__ import annotations

import itertools

import numpy as np

RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                       [0.596, -0.274, -0.322],
                       [0.211, -0.523, 0.312]])
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ)
PERMUTATIONS = np.array([np.eye(3)[list(p)] for p in itertools.permutations(range(3))])  # (6, 3, 3)


def color_maps(rng: np.random.Generator, n: int, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random colour maps: ``(M (n, 3, 3), contrast (n,), shift (n, 3))`` with
    ``y = contrast * (M x - mean(M x)) + mean(M x) + shift`` (x, y in 0-255 RGB)."""
    theta = rng.uniform(-np.pi, np.pi, n) * strength
    sat = 2.0 ** (rng.uniform(-1.0, 1.0, n) * strength)
    contrast = 1.5 ** (rng.uniform(-1.0, 1.0, n) * strength)
    brightness = rng.uniform(-0.1, 0.1, n) * strength * 255.0
    tint, phi = rng.uniform(0.0, 0.12, n) * strength * 255.0, rng.uniform(0.0, 2 * np.pi, n)
    shift = np.stack([brightness, tint * np.cos(phi), tint * np.sin(phi)], -1) @ YIQ_TO_RGB.T  # (n, 3) RGB
    perm = np.where(rng.random(n) < strength / 2, rng.integers(0, 6, n), 0)  # 0 = identity
    c, s = np.cos(theta) * sat, np.sin(theta) * sat
    chroma = np.zeros((n, 3, 3))
    chroma[:, 0, 0] = 1.0
    chroma[:, 1, 1], chroma[:, 1, 2], chroma[:, 2, 1], chroma[:, 2, 2] = c, -s, s, c
    m = YIQ_TO_RGB @ chroma @ RGB_TO_YIQ @ PERMUTATIONS[perm]  # (n, 3, 3): permute, then rotate/scale chroma
    return m, contrast, shift


def jitter_colors(batch: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """``batch`` (B, H, W, 3) uint8 under one random colour map per image (see module doc); a new array.
    ``strength`` 0 returns an unchanged copy; 1 is the widest jitter."""
    if strength <= 0.0:
        return batch.copy()
    b = len(batch)
    m, contrast, shift = color_maps(rng, b, strength)
    x = batch.reshape(b, -1, 3).transpose(0, 2, 1).astype(np.float32)  # (B, 3, HW): pixels contiguous per channel
    # contrast about the mapped mean folds into the map: y = (c M) x + ((1 - c) M mean(x) + shift)
    gain = (m * contrast[:, None, None]).astype(np.float32)             # (B, 3, 3)
    bias = (1.0 - contrast)[:, None] * np.einsum("bij,bj->bi", m, x @ np.full(x.shape[2], 1.0 / x.shape[2], np.float32)) + shift + 0.5  # (B, 3)
    y = np.matmul(gain, x)                                              # (B, 3, HW)
    y += bias[:, :, None].astype(np.float32)
    np.clip(y, 0, 255, out=y)
    return y.transpose(0, 2, 1).astype(np.uint8).reshape(batch.shape)
