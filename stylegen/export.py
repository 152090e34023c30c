"""``stylegen export``: the generator as an ONNX model with dynamic batch, height and width.

    stylegen export [--checkpoint CKPT|RUN|SWEEP|s3://...] --onnx model.onnx

The graph (ONNX opset 18, ``OPSET``; one file, weights embedded; the frozen VGG19 up to relu4_1
is part of it when the model uses it):

    inputs   content  float32 (N, 3, H, W)  RGB in [0, 1]; H, W multiples of 4
             style    float32 (N, 3, h, w)  RGB in [0, 1]; h, w multiples of 4, any size
             alpha    float32 ()            style strength in [0, 1] (a 0-d tensor)
    output   output   float32 (N, 3, H, W)  RGB in [0, 1]  (x 255 and round for 8-bit)

It computes what ``Generator.forward(content, style, alpha)`` computes (the fusion and decoder
are ``controls.fuse_and_decode``, shared with ``stylize``); alpha is a graph input, so the
blend ``alpha·adain + (1 − alpha)·content`` is always in the graph (at alpha = 1 it is exact).
The AdaIN statistics (instance mean/std) are reductions over the actual H, W, so the graph is
right at sizes it was not traced at (tests/test_export.py: 64x64 and 96x160 against torch).
The other controls (preserve-color, mixing, masks, tiles) stay in Python (stylegen.controls).

Exported with torch.onnx's dynamo exporter (``torch.export`` + onnxscript; the TorchScript
exporter is deprecated in torch 2.x). The file is written atomically (storage.write_bytes: a
temp file renamed into place, or an object copied into place on s3://).
"""

from __future__ import annotations

import argparse
import io
import logging
import warnings

from stylegen import storage
from stylegen.errors import UserError
from stylegen.loading import load_generator

log = logging.getLogger(__name__)
OPSET = 18
MAX_SIDE = 8192  # the largest H, W (and h, w) the graph accepts


def onnx_module(gen):
    """``gen`` wrapped as ``forward(content, style, alpha_tensor) -> output`` for export."""
    from torch import nn

    from stylegen.controls import _content_maps, _stat_maps, fuse_and_decode  # lazy: torch; not for `stylegen --help`
    from stylegen.stats import calc_mean_std  # lazy: torch; not for `stylegen --help`

    class OnnxStylizer(nn.Module):
        def __init__(self, g) -> None:
            super().__init__()
            self.gen = g

        def forward(self, content, style, alpha):
            maps = _content_maps(self.gen, content, need_code=True)
            c_stats = {k: calc_mean_std(v) for k, v in maps.items() if k != "c2"}
            target = {k: calc_mean_std(v) for k, v in _stat_maps(self.gen, style).items()}
            return fuse_and_decode(self.gen, maps, c_stats, target, alpha)

    return OnnxStylizer(gen).eval()


def export_bytes(gen, *, opset: int = OPSET) -> bytes:
    """The ONNX model of ``gen`` (see the module doc) as bytes."""
    import torch
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    h, w = Dim("h4", min=4, max=MAX_SIDE // 4), Dim("w4", min=4, max=MAX_SIDE // 4)
    sh, sw = Dim("sh4", min=4, max=MAX_SIDE // 4), Dim("sw4", min=4, max=MAX_SIDE // 4)
    dynamic = {"content": {0: batch, 2: 4 * h, 3: 4 * w}, "style": {0: batch, 2: 4 * sh, 3: 4 * sw}, "alpha": None}
    example = (torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64), torch.tensor(1.0))
    # the exporter logs ~100 lines at INFO/WARNING ("torchvision is not installed", optimizer passes)
    quiet = {logging.getLogger(n): logging.getLogger(n).level for n in ("torch.onnx", "onnxscript", "onnx_ir")}
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter internals (LeafSpec deprecation, axis renaming)
            prog = torch.onnx.export(onnx_module(gen.cpu().eval()), example, dynamo=True, dynamic_shapes=dynamic,
                                     opset_version=opset, input_names=["content", "style", "alpha"],
                                     output_names=["output"], verbose=False)
    except ImportError as e:  # onnxscript / onnx missing from a partial install
        raise UserError(f"ONNX export needs the onnx and onnxscript packages ({e}); "
                        "reinstall stylegen (pip install -e .)") from None
    finally:
        for lg, level in quiet.items():
            lg.setLevel(level)
    buf = io.BytesIO()
    prog.save(buf)
    return buf.getvalue()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="CKPT|SWEEP",
                   help="checkpoint.pt, a dir holding one, a run dir (its newest), a Tune sweep dir (its best, as "
                        "`stylegen best` picks it), local or s3://...; default: the shipped model")
    p.add_argument("--onnx", required=True, metavar="FILE.onnx", help="where to write the ONNX model (local or s3://)")


def run(args: argparse.Namespace) -> int:
    if not str(args.onnx).endswith(".onnx"):
        raise UserError(f"--onnx {args.onnx!r}: name the file *.onnx")
    storage.check_output_file(args.onnx, "--onnx")  # before the (slow) export, not after
    gen, _ = load_generator(args.checkpoint)
    data = export_bytes(gen)
    try:
        storage.write_bytes(args.onnx, data)
    except OSError as e:
        if storage.is_remote(args.onnx) and e.errno is None:
            raise UserError(f"--onnx {storage.explain(e, args.onnx)}") from None
        what, fix = storage.describe_write_error(e)
        raise UserError(f"cannot write --onnx {args.onnx!r} ({what}); {fix} or pass another path") from None
    print(f"{args.onnx} ({len(data) / 1e6:.1f} MB, opset {OPSET}; inputs content, style: float32 "
          "(N, 3, H, W) in [0, 1], H and W multiples of 4; alpha: float32 scalar)")
    return 0
