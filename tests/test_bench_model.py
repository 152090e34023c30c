"""benchmarks/bench_model.py's conv_ceiling row times exactly the convolutions a train step runs: the
calls its hooks record, with the gradients each needs, add up to the FLOPs torch's own counter sees
for the step's convolutions, and each timed pass runs the op of that count."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from stylegen.config import load_config
from stylegen.features import VGGFeatures
from stylegen.train.step import build_state, train_step

from tiny import DEMO, MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_model  # noqa: E402


def _conv_flops(counter: FlopCounterMode) -> int:
    ops = counter.get_flop_counts()["Global"]
    return sum(v for op, v in ops.items() if "convolution" in str(op))


def test_recorded_conv_passes_are_the_steps_convolutions():
    cfg = load_config(str(DEMO), [*MODEL, "data.batch_size=2", "model.vgg_adain=true", "model.fusion=adain",
                                  "loss.identity_fraction=0.5"])
    state = build_state(cfg, torch.device("cpu"))
    vgg = VGGFeatures("random", width=8)
    g = torch.Generator().manual_seed(0)
    c8, s8 = (torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g) for _ in range(2))

    def step():
        train_step(state, vgg, c8, s8, loss_cfg=cfg.loss, optim_cfg=cfg.optim, total_steps=10,
                   device=torch.device("cpu"), amp=False)

    step()
    calls = bench_model.conv_calls(step, [state.generator, vgg])
    with FlopCounterMode(display=False) as counter:
        step()
    passes = {key: bench_model.conv_passes(key, torch.float32) for key in calls}
    recorded = sum(n * flops for key, n in calls.items() for _, flops, _ in passes[key])
    assert recorded == _conv_flops(counter) > 0
    names = {name for p in passes.values() for name, _, _ in p}
    assert names == {"forward", "input_grad", "weight_grad"}  # the VGG's own weights never need a gradient
    assert not any(key[4] for key in calls if any(key[0] is m for m in vgg.modules()))
    for key, p in passes.items():
        for name, flops, fn in p:
            with FlopCounterMode(display=False) as one:
                fn()
            assert _conv_flops(one) == flops, (name, key[1:])
