"""Procedural styles: a seed -> one (size, size, 3) uint8 texture, pure numpy, ~1 ms at 64x64.

Training on the embedded data sees 7 style images; a model that must transfer styles it has never
seen needs many more. These generators give an unbounded supply of distinct textures at no
download and no disk: ``procedural_style(seed)`` is a pure function of the seed (the same seed,
the same pixels, on every machine). The loader replaces a ``data.procedural_styles`` fraction of
each training style batch with them (``mix_procedural``), seeded by the stream's position, so a
resumed run sees exactly the styles it would have (stylegen/data/loader.py).

Each style is one of ``KINDS``, coloured by a random palette (a harmony of 2-6 HSV colours):

- ``noise``:   multi-octave value noise (smoothstep-interpolated random grids, Perlin-like), optionally
               turned into ridges/marble veins, mapped through the palette (smooth or banded)
- ``strokes``: 20-100 soft-edged brush strokes of palette colours, mostly along one flow direction
- ``cells``:   Voronoi mosaic, each cell a palette colour, with or without dark grout
- ``waves``:   stripes, checks or plaid (one or two sin gratings), optionally warped by noise
- ``dots``:    a jittered grid of discs (halftone/polka) over a noise ground

A final pass may add fine grain or posterise to the palette (palette quantisation).
"""

from __future__ import annotations

import numpy as np

KINDS = ("noise", "strokes", "cells", "waves", "dots")
MIN_STD = 0.04  # a style whose every channel varies less than this (of the 0-1 range) is drawn again


# ----------------------------------------------------------------------------- colour

def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """(..., 3) HSV in [0, 1] -> (..., 3) RGB in [0, 1]."""
    h, s, v = hsv[..., 0] % 1.0, hsv[..., 1], hsv[..., 2]
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def palette(rng: np.random.Generator, k: int | None = None) -> np.ndarray:
    """(k, 3) RGB in [0, 1]: a colour harmony (analogous, complementary, triadic or random hues) with
    random saturation and a spread of values, so that palettes differ in hue, vividness and contrast."""
    k = int(rng.integers(2, 7)) if k is None else k
    base = rng.random()
    scheme = rng.integers(4)
    if scheme == 0:    # analogous
        hues = base + rng.uniform(-0.08, 0.08, k)
    elif scheme == 1:  # complementary
        hues = base + 0.5 * rng.integers(0, 2, k) + rng.uniform(-0.04, 0.04, k)
    elif scheme == 2:  # triadic
        hues = base + rng.integers(0, 3, k) / 3.0 + rng.uniform(-0.03, 0.03, k)
    else:
        hues = rng.random(k)
    sat = np.clip(rng.uniform(0.0, 1.0) + rng.uniform(-0.25, 0.25, k), 0.0, 1.0)
    val = np.sort(rng.uniform(0.05, 1.0, k))  # sorted dark -> light: fields map to a value ramp
    return hsv_to_rgb(np.stack([hues, sat, val], -1))


def colorize(field: np.ndarray, pal: np.ndarray, banded: bool) -> np.ndarray:
    """A (H, W) field in [0, 1] -> (H, W, 3) through the palette: a smooth ramp, or hard bands."""
    k = len(pal)
    if banded:
        return pal[np.minimum((field * k).astype(np.int64), k - 1)]
    x = field * (k - 1)
    i = np.minimum(x.astype(np.int64), k - 2) if k > 1 else np.zeros(field.shape, np.int64)
    t = (x - i)[..., None]
    return pal[i] * (1.0 - t) + pal[np.minimum(i + 1, k - 1)] * t


def _normalize(f: np.ndarray) -> np.ndarray:
    lo, hi = f.min(), f.max()
    return (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)


# ----------------------------------------------------------------------------- fields

def value_noise(rng: np.random.Generator, size: int, cells: int, octaves: int, persistence: float) -> np.ndarray:
    """(size, size) multi-octave value noise in [0, 1]: random grids of ``cells * 2**o`` cells,
    smoothstep-interpolated, amplitudes ``persistence**o``."""
    out = np.zeros((size, size))
    amp, total = 1.0, 0.0
    for o in range(octaves):
        n = min(cells * 2 ** o, size)
        grid = rng.random((n + 1, n + 1))
        c = np.linspace(0.0, n, size, endpoint=False) + rng.random() * 0.999  # random phase
        i = np.minimum(c.astype(np.int64), n - 1)
        t = c - i
        t = t * t * (3.0 - 2.0 * t)  # smoothstep: no grid creases
        top = grid[i][:, i] * (1 - t)[None, :] + grid[i][:, i + 1] * t[None, :]
        bot = grid[i + 1][:, i] * (1 - t)[None, :] + grid[i + 1][:, i + 1] * t[None, :]
        out += amp * (top * (1 - t)[:, None] + bot * t[:, None])
        total += amp
        amp *= persistence
    return _normalize(out / total)


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size  # (size, size) each, in [0, 1)
    return y, x


def noise_style(rng: np.random.Generator, size: int) -> np.ndarray:
    f = value_noise(rng, size, int(rng.integers(2, 9)), int(rng.integers(1, 5)), rng.uniform(0.35, 0.7))
    mode = rng.integers(3)
    if mode == 1:    # ridges: sharp bright lines where the noise crosses its middle
        f = 1.0 - np.abs(2.0 * f - 1.0)
        f = f ** rng.uniform(1.0, 4.0)
    elif mode == 2:  # marble: a grating bent by the noise
        y, x = _coords(size)
        th = rng.uniform(0, np.pi)
        f = 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(1, 6) * (x * np.cos(th) + y * np.sin(th)) + rng.uniform(1, 4) * f))
    return colorize(f, palette(rng), banded=bool(rng.random() < 0.4))


def strokes_style(rng: np.random.Generator, size: int) -> np.ndarray:
    """Soft-edged segments painted in order over a palette ground, mostly along one flow angle."""
    pal = palette(rng)
    img = np.broadcast_to(pal[rng.integers(len(pal))], (size, size, 3)).copy()
    y, x = _coords(size)
    flow, spread = rng.uniform(0, np.pi), rng.uniform(0.05, 1.5)
    length, width = rng.uniform(0.08, 0.4), rng.uniform(0.01, 0.06)
    k = int(rng.integers(20, 101))
    # every stroke's parameters in one draw each: (k,) centres, angles, half lengths, widths, colours
    cy, cx = rng.random(k), rng.random(k)
    th = flow + rng.normal(0, spread, k)
    cos, sin = np.cos(th), np.sin(th)
    half, w = 0.5 * length * rng.uniform(0.5, 1.5, k), width * rng.uniform(0.6, 1.4, k)
    cols = np.clip(pal[rng.integers(len(pal), size=k)] + rng.normal(0, 0.04, (k, 3)), 0.0, 1.0)
    r = half + w  # a stroke lies within r of its centre: paint only that box
    y0, y1 = np.maximum((cy - r) * size, 0).astype(int), np.minimum((cy + r) * size + 2, size).astype(int)
    x0, x1 = np.maximum((cx - r) * size, 0).astype(int), np.minimum((cx + r) * size + 2, size).astype(int)
    for j in range(k):
        dy, dx = y[y0[j]:y1[j], x0[j]:x1[j]] - cy[j], x[y0[j]:y1[j], x0[j]:x1[j]] - cx[j]
        along = np.abs(dx * cos[j] + dy * sin[j]) - half[j]
        across = dy * cos[j] - dx * sin[j]
        d = np.hypot(np.maximum(along, 0.0), across)                  # distance to the segment
        a = np.clip((w[j] - d) * (1.0 / (0.35 * w[j])), 0.0, 1.0)[..., None]  # soft edge
        box = img[y0[j]:y1[j], x0[j]:x1[j]]
        box += (cols[j] - box) * a
    return img


def cells_style(rng: np.random.Generator, size: int) -> np.ndarray:
    """A Voronoi mosaic: each cell one palette colour (jittered), with dark grout or none."""
    n = int(rng.integers(6, 80))
    pts = rng.random((n, 2))
    y, x = _coords(size)
    d = ((y[..., None] - pts[:, 0]) ** 2 + (x[..., None] - pts[:, 1]) ** 2).astype(np.float32)  # (size, size, n)
    label = np.argmin(d, axis=-1)
    d1 = np.take_along_axis(d, label[..., None], -1)[..., 0]
    np.put_along_axis(d, label[..., None], np.inf, -1)
    d2 = d.min(axis=-1)  # the second-nearest point (cheaper than np.partition)
    pal = palette(rng)
    cols = np.clip(pal[rng.integers(len(pal), size=n)] + rng.normal(0, 0.05, (n, 3)), 0.0, 1.0)
    img = cols[label]
    if rng.random() < 0.6:
        gap = np.sqrt(d2) - np.sqrt(d1)
        grout = rng.uniform(0.005, 0.03)
        img = np.where((gap < grout)[..., None], pal[0] * rng.uniform(0.0, 0.6), img)
    return img


def waves_style(rng: np.random.Generator, size: int) -> np.ndarray:
    """Stripes (one grating), checks or plaid (two), optionally warped by noise, banded or smooth."""
    y, x = _coords(size)
    warp = value_noise(rng, size, int(rng.integers(2, 5)), 2, 0.5) * rng.uniform(0, 1.5) if rng.random() < 0.5 else 0.0

    def grating() -> np.ndarray:
        th = rng.uniform(0, np.pi)
        freq = rng.uniform(1.5, 12.0)
        g = np.sin(2 * np.pi * (freq * (x * np.cos(th) + y * np.sin(th)) + warp) + rng.uniform(0, 2 * np.pi))
        return np.sign(g) * 0.5 + 0.5 if rng.random() < 0.5 else 0.5 + 0.5 * g  # square or sine

    f = grating()
    kind = rng.integers(3)
    if kind == 1:    # checks
        f = np.abs(f - grating())
    elif kind == 2:  # plaid: two gratings averaged
        f = 0.5 * (f + grating())
    return colorize(_normalize(f), palette(rng), banded=bool(rng.random() < 0.5))


def dots_style(rng: np.random.Generator, size: int) -> np.ndarray:
    """Discs on a (jittered) grid over a noise ground: polka dots, halftone."""
    pal = palette(rng)
    ground = colorize(value_noise(rng, size, 2, 2, 0.5) * 0.5, pal, banded=False)
    n = int(rng.integers(3, 13))
    y, x = _coords(size)
    gy, gx = y * n, x * n
    iy, ix = np.floor(gy).astype(np.int64), np.floor(gx).astype(np.int64)
    jit = rng.uniform(-0.25, 0.25, (n, n, 2)) * rng.random()
    radius = rng.uniform(0.15, 0.48) * (1.0 + rng.uniform(-0.5, 0.5, (n, n)) * rng.random())
    d = np.hypot(gy - iy - 0.5 - jit[iy, ix, 0], gx - ix - 0.5 - jit[iy, ix, 1])
    a = np.clip((radius[iy, ix] - d) / 0.08, 0.0, 1.0)[..., None]
    cols = pal[rng.integers(len(pal), size=(n, n))] if rng.random() < 0.5 else np.broadcast_to(pal[-1], (n, n, 3))
    return ground * (1.0 - a) + cols[iy, ix] * a


GENERATORS = {"noise": noise_style, "strokes": strokes_style, "cells": cells_style, "waves": waves_style,
              "dots": dots_style}


# ----------------------------------------------------------------------------- entry points

def procedural_style(seed: int, size: int = 64) -> np.ndarray:
    """The style of ``seed``: (size, size, 3) uint8, a pure function of (seed, size)."""
    rng = np.random.default_rng([seed, 0x57E1])  # a stream of its own: seeds shared with other uses differ
    for _ in range(8):  # a rare draw is nearly flat (a posterised smooth field, one-band stripes): draw again
        img = GENERATORS[KINDS[rng.integers(len(KINDS))]](rng, size)
        finish = rng.random()
        if finish < 0.25:    # fine grain
            img = img + rng.normal(0, rng.uniform(0.01, 0.06), img.shape)
        elif finish < 0.4:   # posterise to a fresh palette: palette quantisation of the luminance
            lum = img @ np.array([0.299, 0.587, 0.114])
            img = colorize(_normalize(lum), palette(rng), banded=True)
        if img.std(axis=(0, 1)).max() > MIN_STD:
            break
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def mix_procedural(batch: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """``batch`` (B, H, W, 3) uint8 with each sample replaced, with probability ``fraction``, by the
    procedural style of a seed drawn from ``rng``; a new array (the input is not modified)."""
    out = batch.copy()
    if fraction <= 0.0:
        return out
    take = rng.random(len(batch)) < fraction
    seeds = rng.integers(0, 2**62, len(batch))  # drawn for every sample: the draw count is fixed per batch
    for i in np.flatnonzero(take):
        out[i] = procedural_style(int(seeds[i]), batch.shape[1])
    return out
