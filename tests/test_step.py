"""The pure training step: identity term, weighting and the non-finite guard."""

import math
from pathlib import Path

import pytest
import torch

from stylegen.config import load_config
from stylegen.features import VGGFeatures
from stylegen.train.step import build_state, identity_samples, lr_factor, train_step
from tiny import MODEL, tiny_cfg

TINY = [*MODEL, "model.channels=4"]


def _step(overrides, *, cpu_bf16: bool = False):
    cfg = load_config(None, TINY + overrides)
    state = build_state(cfg, torch.device("cpu"))
    vgg = VGGFeatures("random")
    c = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    s = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    return cfg, state, train_step(state, vgg, c, s, loss_cfg=cfg.loss, optim_cfg=cfg.optim, total_steps=10,
                                  device=torch.device("cpu"), cpu_bf16=cpu_bf16)


def test_identity_term_is_computed_and_weighted_once():
    cfg, state, terms = _step(["loss.identity=2.0", "loss.style=1.0", "loss.content=1.0"])
    assert "identity" in terms and terms["identity"] > 0 and state.step == 1
    expected = terms["content"] + terms["style"] + 2.0 * terms["identity"]
    assert terms["total"] == pytest.approx(expected, rel=1e-5)
    _, _, off = _step(["loss.identity=0"])
    assert "identity" not in off


@pytest.mark.parametrize(("batch", "fraction", "k"), [(8, 1.0, 8), (8, 0.25, 2), (8, 0.3, 3), (2, 0.01, 1), (5, 0.5, 3)])
def test_identity_samples(batch, fraction, k):
    assert identity_samples(batch, fraction) == k


def test_identity_fraction_runs_g_on_the_batch_plus_k_contents_and_skips_an_unweighted_gram():
    cfg = load_config(None, TINY + ["loss.identity_fraction=0.25"])
    state = build_state(cfg, torch.device("cpu"))
    seen = []
    state.generator.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[0], out.shape[0])))
    c = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    s = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    terms = train_step(state, VGGFeatures("random"), c, s, loss_cfg=cfg.loss, optim_cfg=cfg.optim, total_steps=10,
                       device=torch.device("cpu"))
    assert seen == [(8 + 2, 8 + 2)]  # 8 stylized + G(c, c) for 2 contents
    assert terms["identity"] > 0 and "gram" not in terms  # loss.gram = 0: no Gram matrices computed
    _, _, with_gram = _step(["loss.gram=0.5"])
    assert with_gram["gram"] > 0


def test_discriminator_step_runs_when_adversarial_on():
    _, state, terms = _step(["loss.adversarial=0.1"])
    assert state.discriminator is not None and "adversarial" in terms and "discriminator" in terms


def test_non_finite_loss_raises_with_a_hint():
    with pytest.raises(FloatingPointError, match="lower optim.lr or the loss weights"):
        _step(["loss.style=1e39", "loss.normalize=false"])


def test_lr_schedule():
    cfg = load_config(None, ["optim.schedule=cosine", "optim.warmup_steps=10"])
    assert lr_factor(0, 110, cfg.optim) == pytest.approx(0.1)
    assert lr_factor(10, 110, cfg.optim) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg.optim) == pytest.approx(0.5)
    assert lr_factor(110, 110, cfg.optim) == pytest.approx(0.0, abs=1e-12)
    assert math.isclose(lr_factor(5, 100, load_config(None, ["optim.schedule=constant"]).optim), 1.0)
    assert load_config(None, []).optim.schedule == "cosine"  # the default since docs/quality.md


def test_cpu_bf16_step_runs_under_autocast_and_keeps_the_losses_float32(monkeypatch):
    from stylegen import losses

    seen = []
    real = losses.calc_mean_std

    def spy(f, eps=1e-5):
        seen.append((f.dtype, torch.is_autocast_enabled("cpu")))
        out = real(f, eps)
        assert all(t.dtype == torch.float32 for t in out)
        return out

    monkeypatch.setattr(losses, "calc_mean_std", spy)
    _, state, terms = _step(["loss.gram=1.0"], cpu_bf16=True)
    assert state.step == 1 and all(math.isfinite(v) for v in terms.values())
    assert (torch.bfloat16, True) in seen  # the VGG features came out of bf16 convs
    seen.clear()
    _step([])
    assert seen and all(dtype == torch.float32 and not on for dtype, on in seen)  # off by default
    x = torch.rand(2, 4, 5, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert losses.gram_matrix(x).dtype == torch.float32
        assert losses.content_loss(x, x + 1).dtype == torch.float32


def test_compiled_generator_checkpoints_and_restores_like_the_bare_one():
    """train.compile wraps the generator (torch.compile compiles lazily: nothing runs here); the checkpoint's
    state dict has the bare module's keys, and a compiled state restores a bare one's checkpoint."""
    from stylegen.models import unwrap
    from stylegen.train.step import checkpoint_state, restore_state

    cfg = load_config(None, [*TINY, "train.compile=true"])
    state = build_state(cfg, torch.device("cpu"))
    assert type(state.generator).__name__ == "OptimizedModule"
    assert unwrap(state.generator) is state.generator._orig_mod
    saved = checkpoint_state(state, {}, {})["generator"]
    bare = build_state(load_config(None, TINY), torch.device("cpu"))
    assert sorted(saved) == sorted(bare.generator.state_dict())  # no "_orig_mod." prefix
    with torch.no_grad():
        for p in bare.generator.parameters():
            p.add_(1.0)
    restore_state(state, checkpoint_state(bare, {}, {}))
    assert all(torch.equal(a, b) for a, b in zip(unwrap(state.generator).state_dict().values(),
                                                 bare.generator.state_dict().values(), strict=True))


def _validate_in_group(rank: int, world: int, store_path: str, out_path: str) -> None:
    """One rank of a gloo group (spawned): validate() on 5 and on 1 fixed pairs, results to out_path."""
    import json

    import torch.distributed as dist

    from stylegen.train.step import validate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = tiny_cfg()
        gen, vgg = build_state(cfg, torch.device("cpu")).generator, VGGFeatures("random")
        g = torch.Generator().manual_seed(1)
        c, s = (torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g) for _ in range(2))
        res = {n: validate(gen, vgg, c[:n], s[:n], torch.device("cpu"), batch=2, rank=rank, world_size=world)
               for n in (5, 1)}
        Path(out_path).write_text(json.dumps(res))
        # both ranks leave together: a rank that tore its gloo pairs down while the other still used them
        # aborted the other once ("terminate called without an active exception", exit -6; 1 of 15 runs here)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_validate_shards_pairs_over_ddp_ranks_and_all_reduces_to_the_one_process_figures(tmp_path):
    """world_size 2: each rank scores half the pairs (5 = 3 + 2; 1 = 1 + 0, an empty shard) and both
    return the figures one process computes over all of them."""
    import json

    import torch.multiprocessing as mp

    from stylegen.train.step import validate

    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_validate_in_group, args=(r, 2, str(tmp_path / "store"), str(outs[r])))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    torch.manual_seed(0)
    gen, vgg = build_state(tiny_cfg(), torch.device("cpu")).generator, VGGFeatures("random")
    g = torch.Generator().manual_seed(1)
    c, s = (torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g) for _ in range(2))
    ranks = [json.loads(o.read_text()) for o in outs]
    for n in (5, 1):
        whole = validate(gen, vgg, c[:n], s[:n], torch.device("cpu"), batch=2)
        for r in ranks:
            assert r[str(n)] == pytest.approx(whole, rel=1e-6)


def test_cpu_bf16_falls_back_to_float32_with_one_warning_on_a_cpu_without_bf16_kernels(monkeypatch, caplog):
    """On an AVX2-only CPU bf16 autocast ran the shipped recipe's step in 25 s against 2.2 s in float32:
    the loop trains in float32 there and says so once; where the kernels exist it keeps bf16."""
    from stylegen.train import loop, step
    from stylegen.train.step import cpu_bf16_for

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level("WARNING", logger="stylegen.train.step"):
        assert cpu_bf16_for(True, cpu, native=lambda: True) is True
        assert cpu_bf16_for(False, cpu, native=lambda: False) is False
        assert cpu_bf16_for(True, cuda, native=lambda: False) is True  # a CPU setting: the GPU path ignores it
        assert not caplog.records
        assert cpu_bf16_for(True, cpu, native=lambda: False) is False
    assert len(caplog.records) == 1 and "train.cpu_bf16 = false" in caplog.records[0].getMessage()

    seen = []
    real = loop.train_step

    def spy(*args, **kwargs):
        seen.append(kwargs["cpu_bf16"])
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", spy)
    cfg = load_config(None, [*TINY, "train.steps=2", "train.report_every=2", "train.checkpoint_every=100",
                             "train.sample_every=100", "train.val_pairs=2", "data.batch_size=2",
                             "metrics.enabled=false", "train.cpu_bf16=true"])

    class Sink:
        def report(self, state, metrics, checkpoint, grid_index, val_pairs):
            pass

    dev = torch.device("cpu")
    for native, expected in ((False, [False, False]), (True, [True, True])):
        monkeypatch.setattr(step, "native_cpu_bf16", lambda native=native: native)
        seen.clear()
        caplog.clear()
        with caplog.at_level("WARNING", logger="stylegen.train.step"):
            loop.training_loop(cfg, build_state(cfg, dev), VGGFeatures("random"),
                               loop.LoopContext(device=dev, progress=False), Sink())
        assert seen == expected
        assert len([r for r in caplog.records if "cpu_bf16" in r.getMessage()]) == (0 if native else 1)
