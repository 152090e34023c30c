"""Generator and discriminator: shapes, sizes, alpha, gradient flow."""

from __future__ import annotations

import pytest
import torch

from stylegen.config import LossConfig, ModelConfig
from stylegen.features import VGGFeatures
from stylegen.losses import d_loss, loss_terms, weighted_total
from stylegen.models.discriminator import Discriminator
from stylegen.models.generator import Generator

CONFIGS = [ModelConfig(fusion="concat", channels=8, res_blocks=2)] + [
    ModelConfig(fusion="adain", channels=8, res_blocks=2, adain_levels=k) for k in (1, 2, 3)]
IDS = ["concat", "adain1", "adain2", "adain3"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("size", [(64, 64), (128, 128), (96, 132)])
def test_generator_shapes_any_size_and_style_size(cfg, size):
    torch.manual_seed(0)
    g = Generator(cfg)
    c = torch.rand(2, 3, *size)
    s = torch.rand(2, 3, 72, 56)  # style of another size
    out = g(c, s)
    assert out.shape == (2, 3, *size)
    assert out.min() >= 0 and out.max() <= 1
    assert g(c, s[:1]).shape == (2, 3, *size)  # one style for the whole batch


def test_generator_rejects_sizes_not_divisible_by_4():
    g = Generator(CONFIGS[1])
    with pytest.raises(ValueError, match="divisible by 4"):
        g(torch.rand(1, 3, 64, 66), torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_alpha_zero_is_stylizing_with_the_content_itself(cfg):
    """adain: alpha=0 keeps content features, = adain(f(c), f(c)); concat: alpha=0 uses c's own style code."""
    torch.manual_seed(0)
    g = Generator(cfg).eval()
    c, s = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(g(c, s, alpha=0.0), g(c, c), rtol=1e-4, atol=1e-5)
        assert (g(c, s, alpha=0.5) - g(c, s)).abs().max() > 1e-6  # untrained outputs vary little; fp noise ~1e-7


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_gradients_reach_every_generator_parameter_and_not_vgg(cfg):
    torch.manual_seed(0)
    g, vgg = Generator(cfg), VGGFeatures("random")
    c, s = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 40, 32)
    lcfg = LossConfig(pixel_l1=1.0, tv=1.0, gram=1.0, identity=0.0)  # identity is the train step's term
    weighted_total(loss_terms(g(c, s), c, s, vgg, lcfg), lcfg).backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in vgg.parameters())


def test_adain_shares_one_encoder_and_concat_has_two():
    assert Generator(CONFIGS[1]).style_encoder is None
    concat = Generator(CONFIGS[0])
    assert concat.style_encoder is not None and concat.style_encoder is not concat.content_encoder


def test_discriminator_patch_logits_and_gradients():
    torch.manual_seed(0)
    d = Discriminator(channels=16)
    real, fake = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    assert d(real).shape == (3, 1, 8, 8)
    assert d(torch.rand(1, 3, 128, 128)).shape == (1, 1, 16, 16)
    d_loss(d(real), d(fake)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())


def test_saturated_output_still_gets_gradients():
    """The [0, 1] clamp is straight-through: a generator pushed far out of range can recover
    (a sigmoid head stalled for good in sanity runs)."""
    torch.manual_seed(0)
    g = Generator(CONFIGS[1])
    with torch.no_grad():
        g.to_rgb.bias.fill_(100.0)
    c, s = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    out = g(c, s)
    assert torch.equal(out, torch.ones_like(out))
    out.mean().backward()
    assert g.to_rgb.bias.grad.abs().sum() > 0 and g.content_encoder.stem[0].weight.grad.abs().sum() > 0


def test_bounded_clamp_gates_only_the_outward_gradient():
    """Out of range, a gradient that would push further out is dropped (the runaway that saturated
    2 matrix runs); one that brings the pixel back passes; in range everything passes."""
    from stylegen.models.generator import bounded_clamp

    x = torch.tensor([-2.0, -2.0, 0.5, 0.5, 3.0, 3.0], requires_grad=True)
    # descent is x -= lr * grad: at -2, grad +1 pushes further down (dropped), -1 pulls up (kept)
    grad = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])
    y = bounded_clamp(x)
    assert torch.equal(y.detach(), torch.tensor([0.0, 0.0, 0.5, 0.5, 1.0, 1.0]))
    y.backward(grad)
    assert torch.equal(x.grad, torch.tensor([0.0, -1.0, 1.0, -1.0, 0.0, 1.0]))


def _vgg_config():
    """A full Config of a tiny vgg_adain generator on random VGG weights."""
    from stylegen.config import Config

    cfg = Config()
    cfg.model.channels, cfg.model.res_blocks, cfg.features.weights, cfg.model.vgg_adain = 8, 1, "random", True
    return cfg


def _vgg_model(channels: int = 8) -> Generator:
    torch.manual_seed(0)
    return Generator(ModelConfig(channels=channels, res_blocks=1, vgg_adain=True), vgg=VGGFeatures("random"))


@pytest.mark.parametrize("size", [(64, 64), (96, 132)])
def test_vgg_adain_keeps_vgg_out_of_its_state_dict_and_takes_any_size(size):
    g = _vgg_model()
    sd = g.state_dict()
    assert sd and not [k for k in sd if k.startswith("vgg.")] and [k for k in sd if k.startswith("vgg_in.")]
    c, s = torch.rand(2, 3, *size), torch.rand(1, 3, 72, 56)
    with torch.no_grad():
        out = g(c, s)
        assert out.shape == (2, 3, *size)
        other = _vgg_model()
        for p in other.parameters():
            if p.requires_grad:
                p.add_(1.0)  # different weights until the load
        other.load_state_dict(sd, strict=True)  # VGG keys neither saved nor required
        torch.testing.assert_close(other(c, s), out)


def test_vgg_adain_gradients_reach_all_but_the_vgg_and_alpha_zero_is_reconstruction():
    g = _vgg_model()
    c, s = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 40, 32)
    g(c, s).mean().backward()
    for name, p in g.named_parameters():
        if name.startswith("vgg."):
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        torch.testing.assert_close(g(c, s[:, :, :32], alpha=0.0), g(c, c), rtol=1e-4, atol=1e-5)
        assert (g(c, s) - g(c, c)).abs().max() > 1e-5
        # the VGG branch matters: zeroing its input conv changes the output
        plain = g(c, s)
        g.vgg_in[0].weight.zero_()
        g.vgg_in[0].bias.zero_()
        assert (g(c, s) - plain).abs().max() > 1e-6


def test_vgg_adain_needs_the_vgg():
    with pytest.raises(ValueError, match="build_generator"):
        Generator(ModelConfig(channels=8, vgg_adain=True))


def test_vgg_adain_checkpoint_loads_through_its_config():
    """A checkpoint carries no VGG weights: loading rebuilds them from features.weights."""
    from stylegen.config import to_dict
    from stylegen.models.generator import build_generator
    from stylegen.checkpoint import generator_from_state

    cfg = _vgg_config()
    g = build_generator(cfg)
    loaded, _ = generator_from_state({"config": to_dict(cfg), "generator": g.state_dict()}, "ckpt.pt")
    c, s = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(c, s), g.eval()(c, s))


def test_train_step_feeds_vgg_adain_the_loss_features_it_would_compute(monkeypatch):
    from stylegen.losses import target_features
    from stylegen.train.step import build_state, train_step

    g = _vgg_model()
    c, s = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(g(c, s, vgg_feats=target_features(g.vgg, c, s, LossConfig())), g(c, s))

    cfg = _vgg_config()
    state = build_state(cfg, torch.device("cpu"))
    calls = []
    monkeypatch.setattr(state.generator.vgg, "forward", lambda *a, **k: calls.append(1))
    before = state.generator.vgg_in[0].weight.detach().clone()
    terms = train_step(state, g.vgg, (c * 255).byte(), (s * 255).byte(), loss_cfg=cfg.loss, optim_cfg=cfg.optim,
                       total_steps=10, device=torch.device("cpu"))
    assert {"content", "style", "identity"} <= set(terms)
    assert not calls  # the generator ran no VGG pass of its own
    assert not torch.equal(state.generator.vgg_in[0].weight, before)  # and its VGG branch trained
    cfg.loss.identity_fraction = 0.5  # G(c, c) for one of the two contents: features paired to match
    terms = train_step(state, g.vgg, (c * 255).byte(), (s * 255).byte(), loss_cfg=cfg.loss, optim_cfg=cfg.optim,
                       total_steps=10, device=torch.device("cpu"))
    assert terms["identity"] > 0 and not calls
