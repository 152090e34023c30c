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
               "--batch", "2", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for label in ("model", "identity (output=content)", "style copy (output=style)", "gatys (10 steps)"):
        assert label in printed
    res = json.loads(out.read_text())
    assert list(res) == list(TOP_KEYS)
    assert res["format"] == "stylegen-eval-v1" and res["pairs"] == 2 and res["step"] == 7
    assert res["image_size"] == 64 and res["features"] == "random" and res["gatys_steps"] == 10
    assert res["gatys_lr"] == 0.1
    assert res["content_layer"] == "relu4_1" and res["style_layers"] == ["relu1_1", "relu2_1", "relu3_1", "relu4_1"]
    rows = res["rows"]
    assert list(rows) == ["model", "identity", "style_copy", "gatys"]
    for r in rows.values():
        assert set(r) == {"label", *COLUMNS}
    ident, sc, gat, model = rows["identity"], rows["style_copy"], rows["gatys"], rows["model"]
    assert ident["content"] == 0 and ident["content_n"] == 0 and ident["objective_n"] == pytest.approx(1)
    assert sc["style"] == 0 and sc["style_n"] == 0 and sc["objective_n"] == pytest.approx(1)
    assert gat["objective_n"] < 0.9 * ident["objective_n"]  # the optimisation reference improves on copying
    assert gat["img_s"] > 0 and gat["psnr"] is None and ident["img_s"] is None
    assert math.isfinite(model["psnr"]) and 0 < model["psnr"] <= 100 and model["img_s"] > 0
    assert model["objective_n"] == pytest.approx(model["content_n"] + model["style_n"])
    assert not [p for p in out.parent.iterdir() if p.name != "eval.json"]  # atomic: no temp file left


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


@pytest.mark.parametrize("case", ["random bytes", "missing", "pairs 0", "bad shards"])
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
