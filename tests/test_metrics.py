"""stylegen.metrics: naming rules of the exposition, counts after a simulated local run, lifecycle."""

from __future__ import annotations

import math
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stylegen.errors import UserError
from stylegen.metrics import (COMMAND_SPECS, METRIC_NAMES, SERVE_SPECS, TRAIN_SPECS, CommandMetrics, TrainMetrics,
                              series_names)
from tiny import MODEL

LOSSES = {"content": 1.25, "style": 3.5, "adv": 0.5, "total": 7.0}


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(text: str, name: str, **labels: str) -> float:
    hits = [v for (n, lab), v in _samples(text).items() if n == name and set(labels.items()) <= lab]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} samples"
    return hits[0]


@pytest.fixture
def metrics():
    m = TrainMetrics.create("prometheus", run="unit", rank=0, trial="t7", port=0)
    yield m
    m.close()


def test_exposition_follows_naming_rules(metrics):
    metrics.step(0.2, 8, 0.05, LOSSES)
    metrics.val(0.4)
    metrics.checkpoint_saved(0.3)
    metrics.worker_restart()
    metrics.data_resumed(2, 17, 0.12)
    families = list(text_string_to_metric_families(metrics.exposition().decode()))
    kinds = {s.name: s.kind for s in TRAIN_SPECS}
    seen = set()
    for fam in families:
        full = fam.name + "_total" if fam.type == "counter" else fam.name
        seen.add(full)
        assert full.startswith("stylegen_"), full
        assert full in kinds and kinds[full] == fam.type, (full, fam.type)
        for s in fam.samples:
            assert set(s.labels) - {"le", "term", "version", "torch", "ray", "field"} == {"run", "rank", "trial"}, s
            if fam.type == "counter":
                assert s.name.endswith("_total"), s.name
            if fam.type == "histogram":
                assert s.name.removeprefix(fam.name) in ("_bucket", "_sum", "_count"), s.name
        if fam.type == "histogram" or "duration" in full or "timestamp" in full:
            assert full.endswith("_seconds"), full
        if "memory" in full:
            assert full.endswith("_bytes"), full
    # every declared training metric is registered; GPU memory has no sample without a GPU
    assert seen == {s.name for s in TRAIN_SPECS}
    with_samples = {f.name for f in families if f.samples}
    assert "stylegen_device_memory_allocated_bytes" not in with_samples
    assert "stylegen_train_samples" in with_samples and "stylegen_val_score" in with_samples
    resume = {s.labels["field"]: s.value for f in families if f.name == "stylegen_data_resume_position"
              for s in f.samples}
    assert resume == {"epoch": 2.0, "batch": 17.0}
    assert set(METRIC_NAMES) == {s.name for s in TRAIN_SPECS + COMMAND_SPECS + SERVE_SPECS}
    assert all(n.startswith("stylegen_") for n in METRIC_NAMES)


def test_simulated_run_counts_samples_over_http(metrics):
    steps, batch = 13, 6
    for i in range(steps):
        metrics.step(0.1 + 0.01 * i, batch, 0.02, {**LOSSES, "total": 7.0 - i})
    metrics.val(0.61)
    assert metrics.url.startswith("http://127.0.0.1:") and metrics.url.endswith("/metrics")
    text = _scrape(metrics.url)
    lab = {"run": "unit", "rank": "0", "trial": "t7"}
    assert _value(text, "stylegen_train_samples_total", **lab) == steps * batch
    assert _value(text, "stylegen_train_steps_total", **lab) == steps
    assert _value(text, "stylegen_train_step_duration_seconds_count", **lab) == steps
    assert _value(text, "stylegen_train_step_seconds_total", **lab) == pytest.approx(sum(0.1 + 0.01 * i for i in range(steps)))
    assert _value(text, "stylegen_data_wait_seconds_total", **lab) == pytest.approx(0.02 * steps)
    assert _value(text, "stylegen_train_loss", term="total") == 7.0 - (steps - 1)  # the last value
    assert _value(text, "stylegen_train_loss", term="style") == 3.5
    assert _value(text, "stylegen_train_loss_nonfinite", term="style") == 0
    assert _value(text, "stylegen_val_score") == pytest.approx(0.61)
    assert _value(text, "stylegen_train_running") == 1.0
    assert _value(text, "stylegen_build_info", ray="2.60.0") == 1.0


def test_checkpoint_restart_and_nan_loss(metrics):
    metrics.step(0.1, 2, 0.0, {"total": float("nan")})
    metrics.checkpoint_saved(0.4)
    metrics.checkpoint_saved(0.2)
    metrics.worker_restart()
    text = _scrape(metrics.url)
    assert math.isnan(_value(text, "stylegen_train_loss", term="total"))
    assert _value(text, "stylegen_train_loss_nonfinite", term="total") == 1
    assert _value(text, "stylegen_checkpoint_save_duration_seconds_count") == 2
    assert _value(text, "stylegen_checkpoint_save_duration_seconds_sum") == pytest.approx(0.6)
    assert _value(text, "stylegen_checkpoint_last_success_timestamp_seconds") > 1.7e9
    assert _value(text, "stylegen_worker_restarts_total") == 1


def test_close_stops_endpoint_and_marks_not_running():
    m = TrainMetrics.create("prometheus", run="c", rank=1, port=0)
    url = m.url
    _scrape(url)
    m.close()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _scrape(url)
    m.close()  # idempotent
    m.step(0.1, 1, 0.0, {})  # after close: ignored, no error


def test_two_instances_do_not_share_a_registry():
    a = TrainMetrics.create("prometheus", run="a", rank=0, port=0)
    b = TrainMetrics.create("prometheus", run="b", rank=1, port=0)
    try:
        a.step(0.1, 5, 0.0, {})
        assert a.url != b.url
        assert 'run="a"' not in _scrape(b.url)
        assert _value(_scrape(a.url), "stylegen_train_samples_total") == 5
        assert _value(_scrape(b.url), "stylegen_train_samples_total") == 0
    finally:
        a.close()
        b.close()


def test_port_in_use_is_a_user_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UserError, match=f"127.0.0.1:{port}.*metrics.port"):
            TrainMetrics.create("prometheus", run="x", rank=0, port=port)


def test_none_backend_and_bad_backend():
    m = TrainMetrics.create("none", run="x", rank=0)
    m.step(0.1, 4, 0.0, LOSSES)
    m.val(1.0)
    m.checkpoint_saved(0.1)
    m.worker_restart()
    assert m.url == "" and m.exposition() == b""
    m.close()
    with pytest.raises(UserError, match="unknown metrics backend 'statsd'"):
        TrainMetrics.create("statsd", run="x", rank=0)


def test_ray_backend_without_ray_init_is_a_user_error():
    import ray

    if ray.is_initialized():  # another test left Ray connected in this process
        ray.shutdown()
    with pytest.raises(UserError, match="ray.init"):
        TrainMetrics.create("ray", run="x", rank=0)


def test_series_names_expand_histograms():
    names = series_names()
    assert "stylegen_train_step_duration_seconds_bucket" in names
    assert "stylegen_train_step_duration_seconds" not in names
    assert "stylegen_train_samples_total" in names


def test_command_metrics_textfile(tmp_path):
    c = CommandMetrics(run="shard1")
    c.shard_images("written", 10)
    c.shard_images("skipped")
    c.stylized(3)
    with pytest.raises(ValueError):
        c.shard_images("lost")
    path = tmp_path / "stylegen.prom"
    c.write_textfile(str(path))
    text = path.read_text()
    assert _value(text, "stylegen_shard_images_total", result="written") == 10
    assert _value(text, "stylegen_shard_images_total", result="skipped") == 1
    assert _value(text, "stylegen_stylize_images_total") == 3
    assert "_created" not in text
    url = c.serve(port=0)
    assert _value(_scrape(url), "stylegen_stylize_images_total") == 3
    c.close()


def test_flops_are_counted_by_hand_for_a_conv_and_the_loop_reports_mfu_against_the_peak():
    import torch

    from stylegen.config import load_config
    from stylegen.features import build_features
    from stylegen.flops import count_flops
    from stylegen.train.loop import LoopContext, training_loop
    from stylegen.train.step import build_state

    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    _, flops = count_flops(lambda: conv(x).sum().backward())
    fwd = 2 * 8 * 3 * 3 * 3 * 16 * 16 * 2  # 2 FLOPs per multiply-add, per output pixel and sample
    assert flops == 3 * fwd  # forward, grad of the input, grad of the weight

    cfg = load_config(None, ["train.steps=4", "train.report_every=2", "train.checkpoint_every=100",
                             "train.sample_every=100", "train.val_pairs=2", "data.batch_size=2", *MODEL,
                             "model.channels=4", "metrics.enabled=false",
                             "train.peak_flops=1e12"])
    reports = []

    class Sink:
        def report(self, state, metrics, checkpoint, grid_index, val_pairs):
            reports.append(dict(metrics))

    dev = torch.device("cpu")
    vgg = build_features(cfg.features)
    training_loop(cfg, build_state(cfg, dev), vgg, LoopContext(device=dev, progress=False), Sink())
    _, vgg_fwd = count_flops(lambda: vgg(torch.rand(2, 3, 64, 64), layers=("relu4_1",)))  # the losses' deepest
    for r in reports:
        assert r["flops_per_s"] > 0 and r["mfu"] == pytest.approx(r["flops_per_s"] / 1e12)
    # one step runs at least VGG over content, style and output, and the output's backward through it
    step_flops = reports[-1]["flops_per_s"] * 2 / reports[-1]["img_per_s"]  # FLOP/s / steps/s, 1 worker
    assert step_flops >= 4 * vgg_fwd, (step_flops, vgg_fwd)


def test_cpu_peak_follows_the_vector_width_torch_reports():
    import torch

    from stylegen.flops import cpu_flops_per_thread, default_peak_flops

    assert cpu_flops_per_thread("AVX512") == pytest.approx(153.6e9)
    assert cpu_flops_per_thread("AVX512_BF16") == pytest.approx(153.6e9)
    assert cpu_flops_per_thread("AVX2") == pytest.approx(76.8e9)
    assert cpu_flops_per_thread("DEFAULT") == pytest.approx(38.4e9)
    here = cpu_flops_per_thread(torch.backends.cpu.get_cpu_capability())
    assert default_peak_flops(torch.device("cpu"), 3) == pytest.approx(3 * here)
