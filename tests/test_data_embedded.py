"""Embedded default data: built once from the images inside the scikit-image wheel, reused, repaired."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from stylegen.config import DataConfig
from stylegen.data import shardio
from stylegen.data.embedded import ensure_embedded
from stylegen.data.loader import build_loader, load_pairs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    # in a fresh interpreter, to check that skimage itself is never imported
    code = ("import sys; from stylegen.data.embedded import ensure_embedded; "
            f"ensure_embedded({str(root / 'embedded-v1')!r}); print('skimage' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    return root


def counts(d):
    rows, meta = shardio.read_manifest(d)
    got = {}
    for r in rows:
        got[r["split"]] = got.get(r["split"], 0) + r["samples"]
    return got, meta


def test_sizes_and_splits(cache):
    shards = ensure_embedded(cache / "embedded-v1")
    c, meta = counts(shards.content_dir)
    s, _ = counts(shards.style_dir)
    assert c["train"] >= 2500 and c["val"] >= 50 and meta["complete"]
    assert s["train"] >= 300 and s["val"] >= 20


def test_reused_and_repaired(cache):
    shards = ensure_embedded(cache / "embedded-v1")
    files = sorted(shards.content_dir.glob("*.tar"))
    before = {f: f.stat().st_mtime_ns for f in files}
    ensure_embedded(cache / "embedded-v1")
    assert {f: f.stat().st_mtime_ns for f in files} == before  # nothing rebuilt
    good = files[0].read_bytes()
    data = bytearray(good)
    data[1000] ^= 0xFF
    files[0].write_bytes(bytes(data))
    ensure_embedded(cache / "embedded-v1")
    assert files[0].read_bytes() == good  # the damaged shard was rebuilt identically
    assert files[1].stat().st_mtime_ns == before[files[1]]


def test_default_config_loads_embedded(cache, monkeypatch):
    monkeypatch.setenv("STYLEGEN_CACHE", str(cache))
    loader = build_loader(DataConfig(batch_size=8, steps_per_epoch=3), rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (8, 3, 64, 64)
    assert batches[0][0].float().std() > 10  # real photos, not blank
    c, s = load_pairs(DataConfig(), 4)
    assert c.shape == s.shape == (4, 3, 64, 64) and c.dtype == torch.uint8 and not torch.equal(c, s)
