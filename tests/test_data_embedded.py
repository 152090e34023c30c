"""Embedded default data: built once from the images inside the scikit-image wheel, reused, repaired,
and split by source image (train / val / eval never share an image)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stylegen.config import DataConfig
from stylegen.data import shardio
from stylegen.data.embedded import CONTENT_SPLITS, STYLE_SPLITS, VERSION, ensure_embedded
from stylegen.data.loader import build_loader, load_pairs, stream_urls


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    # in a fresh interpreter, to check that skimage itself is never imported
    code = ("import sys; from stylegen.data.embedded import ensure_embedded; "
            f"ensure_embedded({str(root / VERSION)!r}); print('skimage' in sys.modules)")
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


def samples(shard: Path) -> list[tuple[str, bytes]]:
    """(source file name, raw HWC pixels) of every sample of a shard, from its ``.json`` and ``.rgb8``."""
    data = shard.read_bytes()
    out = []
    for _, parts in shardio.iter_samples(data):
        meta = json.loads(data[parts["json"][0]:sum(parts["json"])])
        out.append((Path(meta["source"]).name, data[parts["rgb8"][0]:sum(parts["rgb8"])]))
    return out


def by_split(d: Path) -> dict[str, list[tuple[str, bytes]]]:
    rows, _ = shardio.read_manifest(d)
    got: dict[str, list] = {}
    for r in rows:
        got.setdefault(r["split"], []).extend(samples(d / r["file"]))
    return got


def test_sizes_and_splits(cache):
    shards = ensure_embedded(cache / VERSION)
    c, meta = counts(shards.content_dir)
    s, _ = counts(shards.style_dir)
    assert meta["complete"]
    assert c == {"train": 280 * len(CONTENT_SPLITS["train"]), "val": 280 * len(CONTENT_SPLITS["val"])}
    assert c["train"] >= 2500 and s["train"] >= 300
    assert s == {"train": 50 * len(STYLE_SPLITS["train"]), "val": 50 * len(STYLE_SPLITS["val"])}
    assert counts(shards.eval_content_dir)[0] == {"val": 280 * len(CONTENT_SPLITS["eval"])}
    assert counts(shards.eval_style_dir)[0] == {"val": 50 * len(STYLE_SPLITS["eval"])}


def test_no_val_or_eval_image_in_training_shards(cache):
    """The split is by source image: the training shards' sources (their per-sample .json) hold no
    val or eval image, val and eval share none either, and each set is exactly the documented list."""
    shards = ensure_embedded(cache / VERSION)
    content, style = by_split(shards.content_dir), by_split(shards.style_dir)
    found = {
        "train": {n for n, _ in content["train"] + style["train"]},
        "val": {n for n, _ in content["val"] + style["val"]},
        "eval": {n for n, _ in by_split(shards.eval_content_dir)["val"] + by_split(shards.eval_style_dir)["val"]},
    }
    assert not found["train"] & found["val"]
    assert not found["train"] & found["eval"]
    assert not found["val"] & found["eval"]
    for name in ("train", "val", "eval"):
        assert found[name] == set(CONTENT_SPLITS[name]) | set(STYLE_SPLITS[name]), name
    # the stereo pair is one scene: both halves on the same side of the split
    assert {"motorcycle_left.png", "motorcycle_right.png"} <= found["train"]
    # and the pixels differ too, not only the names (no crop of a held-out image hides under a train name)
    train_px = {px for _, px in content["train"]}
    assert not train_px & {px for _, px in content["val"]}


def test_val_pairs_and_default_eval_pairs_are_held_out(cache, monkeypatch):
    """Training's val_score (and Tune's) reads the val images; `stylegen eval` without pair options
    reads the eval images; both sets of fixed pairs mix their images."""
    from stylegen.evaluate import load_eval_pairs

    monkeypatch.setenv("STYLEGEN_CACHE", str(cache))
    shards = ensure_embedded()
    c_urls, s_urls, same = stream_urls(DataConfig(), "val")
    assert not same and c_urls and s_urls
    for url in c_urls + s_urls:
        assert {n for n, _ in samples(Path(url))} <= set(CONTENT_SPLITS["val"]) | set(STYLE_SPLITS["val"])

    def sources(pairs: torch.Tensor, pool: list[tuple[str, bytes]]) -> list[str]:
        index = {px: n for n, px in pool}
        return [index[im.permute(1, 2, 0).contiguous().numpy().tobytes()] for im in pairs]

    c, s = load_pairs(DataConfig(), 8, split="val", seed=1234)
    content, style = by_split(shards.content_dir)["val"], by_split(shards.style_dir)["val"]
    assert set(sources(c, content)) == set(CONTENT_SPLITS["val"])
    assert set(sources(s, style)) == set(STYLE_SPLITS["val"])

    args = argparse.Namespace(content_shards=[], style_shards=[], pairs=16)
    c, s = load_eval_pairs(args, 64)
    assert c.shape == s.shape == (16, 3, 64, 64)
    content, style = by_split(shards.eval_content_dir)["val"], by_split(shards.eval_style_dir)["val"]
    assert set(sources(c, content)) == set(CONTENT_SPLITS["eval"])
    assert set(sources(s, style)) == set(STYLE_SPLITS["eval"])


def test_reused_and_repaired(cache):
    shards = ensure_embedded(cache / VERSION)
    files = sorted(shards.content_dir.glob("*.tar"))
    before = {f: f.stat().st_mtime_ns for f in files}
    ensure_embedded(cache / VERSION)
    assert {f: f.stat().st_mtime_ns for f in files} == before  # nothing rebuilt
    good = files[0].read_bytes()
    data = bytearray(good)
    data[1000] ^= 0xFF
    files[0].write_bytes(bytes(data))
    ensure_embedded(cache / VERSION)
    assert files[0].read_bytes() == good  # the damaged shard was rebuilt identically
    assert files[1].stat().st_mtime_ns == before[files[1]]


def test_staged_sources_follow_the_lists(cache, monkeypatch):
    """The staged folders hold exactly the listed files: a file an earlier list staged is removed,
    so the shards never include it."""
    import stylegen.data.embedded as emb

    root = cache / VERSION
    stale = root / "src" / "content" / "train" / "camera.png"
    stale.symlink_to(emb.skimage_data_dir() / "camera.png")
    ensure_embedded(root)
    assert not stale.exists() and not stale.is_symlink()
    assert counts(root / "content")[0]["train"] == 280 * len(CONTENT_SPLITS["train"])


def test_default_config_loads_embedded(cache, monkeypatch):
    monkeypatch.setenv("STYLEGEN_CACHE", str(cache))
    loader = build_loader(DataConfig(batch_size=8, steps_per_epoch=3), rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (8, 3, 64, 64)
    assert batches[0][0].float().std() > 10  # real photos, not blank
    c, s = load_pairs(DataConfig(), 4)
    assert c.shape == s.shape == (4, 3, 64, 64) and c.dtype == torch.uint8 and not torch.equal(c, s)
