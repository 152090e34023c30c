"""``stylegen export --onnx``: the ONNX graph against torch in onnxruntime, at the traced size and
at sizes it was not traced at; checkpoint resolution (sweep -> its best trial); the atomic write.

Measured (shipped model, opset 18): max |onnx - torch| ~3e-7 at 64x64 and at 96x160 (limit 1e-3).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from stylegen import export
from stylegen.cli import main
from stylegen.errors import UserError
from test_best import FINISHED, make_sweep  # tests/ is on sys.path (pytest prepend mode)

LIMIT = 1e-3


def run_onnx(sess: ort.InferenceSession, c: torch.Tensor, s: torch.Tensor, alpha: float) -> np.ndarray:
    return sess.run(["output"], {"content": c.numpy(), "style": s.numpy(), "alpha": np.array(alpha, np.float32)})[0]


@pytest.fixture(scope="module")
def shipped_onnx(tmp_path_factory):
    from stylegen.loading import load_generator

    gen = load_generator(None)[0]
    path = tmp_path_factory.mktemp("onnx") / "shipped.onnx"
    assert main(["export", "--onnx", str(path)]) == 0  # no --checkpoint: the shipped model
    return gen, path


def test_onnx_matches_torch_at_64_and_at_untraced_sizes(shipped_onnx, capsys):
    gen, path = shipped_onnx
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}[""] == export.OPSET == 18
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dims = {i.name: i.shape for i in sess.get_inputs()}
    assert all(isinstance(d, str) for d in dims["content"][2:] + dims["style"][2:])  # dynamic H, W
    assert dims["alpha"] == []
    g = torch.Generator().manual_seed(0)
    figures = {}
    # (content H, W), (style h, w), alpha, batch: 64x64 is the traced size; the rest are not
    for (h, w), (sh, sw), alpha, b in [((64, 64), (64, 64), 1.0, 1), ((96, 160), (64, 48), 0.6, 1),
                                        ((96, 160), (96, 160), 1.0, 2), ((36, 100), (128, 128), 0.0, 1)]:
        c, s = torch.rand(b, 3, h, w, generator=g), torch.rand(b, 3, sh, sw, generator=g)
        with torch.inference_mode():
            want = gen(c, s, alpha=alpha).numpy()
        got = run_onnx(sess, c, s, alpha)
        assert got.shape == want.shape
        figures[f"{h}x{w} style {sh}x{sw} alpha {alpha} batch {b}"] = diff = float(np.abs(got - want).max())
        assert diff <= LIMIT, figures
    with capsys.disabled():
        print("\nONNX max |diff| vs torch:", {k: f"{v:.2e}" for k, v in figures.items()})


def test_onnx_statistics_follow_the_input_not_the_trace(shipped_onnx):
    """AdaIN's mean/std are reduced over the actual H, W: a content that is only uniform on the
    traced 64x64 window but not beyond gets the untiled torch output, not the trace's."""
    gen, path = shipped_onnx
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    c = torch.zeros(1, 3, 64, 192)
    c[..., 64:] = 1.0  # statistics over the whole 64x192 differ from those of its first 64x64
    s = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = gen(c, s).numpy()
        first = gen(c[..., :64], s).numpy()
    got = run_onnx(sess, c, s, 1.0)
    assert np.abs(got - want).max() <= LIMIT
    assert np.abs(got[..., :64] - first).mean() > 0.01  # the statistics did change with the width


def test_export_a_sweep_uses_its_best_checkpoint_and_writes_atomically(tmp_path, capsys):
    import onnxruntime as ort

    from stylegen.checkpoint import generator_from_state, load_checkpoint
    from stylegen.best import resolve_model

    sweep = make_sweep(tmp_path / "sweep", FINISHED)
    best = sweep / "trial_runs" / "trial-a_00001" / "step_00000010" / "checkpoint.pt"  # val_score 2.2
    assert resolve_model(sweep)[0] == str(best)
    out = tmp_path / "models" / "sweep.onnx"
    assert main(["export", "--checkpoint", str(sweep), "--onnx", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["sweep.onnx"]  # no temp file left
    gen = generator_from_state(load_checkpoint(best), str(best))[0]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    c, s = torch.rand(1, 3, 96, 160), torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        want = gen(c, s, alpha=0.5).numpy()
    assert np.abs(run_onnx(sess, c, s, 0.5) - want).max() <= LIMIT
    # and stylize/serve load the same checkpoint from the sweep
    from stylegen.loading import load_generator

    loaded = load_generator(sweep)[0]
    assert all(torch.equal(v, gen.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_sweep_without_checkpoints_is_one_line(tmp_path):
    from stylegen.best import resolve_model

    sweep = make_sweep(tmp_path / "sweep", FINISHED[:1], with_checkpoints=False)
    with pytest.raises(UserError, match="no trial with a checkpointed val_score"):
        resolve_model(sweep)


@pytest.mark.parametrize("target,needle", [("model.bin", "name the file *.onnx"), ("DIR.onnx", "is a directory")])
def test_bad_onnx_target_is_refused_before_export(tmp_path, monkeypatch, capsys, target, needle):
    (tmp_path / "DIR.onnx").mkdir()
    monkeypatch.setattr(export, "export_bytes", lambda *a, **k: pytest.fail("exported before checking the target"))
    assert main(["export", "--onnx", str(tmp_path / target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stylegen export: error: ") and needle in err[0], err


def test_failed_export_leaves_an_earlier_file_untouched(tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"earlier model")

    def boom(*a, **k):
        raise RuntimeError("exporter crashed")
    monkeypatch.setattr(export, "export_bytes", boom)
    with pytest.raises(RuntimeError):
        main(["export", "--onnx", str(out)])
    assert out.read_bytes() == b"earlier model" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
