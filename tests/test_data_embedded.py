"""Embedded default data: built once from the images inside the scikit-image and matplotlib wheels, reused,
repaired, and split by source image (train / val / eval never share an image; v3's additions are train only
and left the val and eval pairs byte-for-byte as they were)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stylegen.config import DataConfig
from stylegen.data import shardio
from stylegen.data.embedded import CONTENT_ADDED, CONTENT_SPLITS, STYLE_ADDED, STYLE_SPLITS, VERSION, ensure_embedded
from stylegen.data.loader import build_loader, load_pairs, stream_urls


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    # in a fresh interpreter, to check that skimage and matplotlib themselves are never imported
    code = ("import sys; from stylegen.data.embedded import ensure_embedded; "
            f"ensure_embedded({str(root / VERSION)!r}); print('skimage' in sys.modules or 'matplotlib' in sys.modules)")
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


# The v2 val and eval shards' pixels, sample by sample in shard order (what load_pairs reads): v3 added
# train images only, so val_score's pairs, `stylegen eval`'s pairs and every eval figure in docs/ stay.
V2_HELD_OUT = {
    "content": "8f3a6c8ab2b1c36d2a36e2a7e4750af4aa160b81402bcd44b314ac50457a6115",
    "style": "39f31e7061366975ca894bd9fb9372dc4eb7d7f2b221ba7153cf6033b1cca91b",
    "eval/content": "6cd441d75f05fb8e347d39755d3c0b9cd81bb6f30aeb3d4b439d2c457a817fe9",
    "eval/style": "7e5ae7a113a026b968d4a8ab657a9c925221a7573156061a1435ddfd0cab0af0",
}
V2_LISTS = {  # the v2 val and eval images, which v3 must not change
    "val": {"rocket.jpg", "coins.png", "grass.png", "retina.jpg"},
    "eval": {"chelsea.png", "camera.png", "gravel.png", "ihc.png"},
}


def test_the_held_out_pixels_are_v2s():
    from stylegen.data.embedded import SAME_HELD_OUT

    assert SAME_HELD_OUT == ("embedded-v2", VERSION)  # what V2_HELD_OUT's digests vouch for


def held_out_pixels(d: Path) -> str:
    rows, _ = shardio.read_manifest(d)
    h = hashlib.sha256()
    for r in rows:
        if r["split"] == "val":
            for _, px in samples(d / r["file"]):
                h.update(px)
    return h.hexdigest()


def test_sizes_and_splits(cache):
    shards = ensure_embedded(cache / VERSION)
    c, meta = counts(shards.content_dir)
    s, _ = counts(shards.style_dir)
    assert meta["complete"]
    n_c, n_s = len(CONTENT_SPLITS["train"]) - len(CONTENT_ADDED), len(STYLE_SPLITS["train"]) - len(STYLE_ADDED)
    assert c == {"train": 280 * n_c, "val": 280 * len(CONTENT_SPLITS["val"])}
    assert s == {"train": 50 * n_s, "val": 50 * len(STYLE_SPLITS["val"])}
    assert counts(shards.extra_content_dir)[0] == {"train": 280 * len(CONTENT_ADDED)}
    assert counts(shards.extra_style_dir)[0] == {"train": 50 * len(STYLE_ADDED)}
    assert c["train"] + 280 * len(CONTENT_ADDED) >= 3500 and s["train"] + 50 * len(STYLE_ADDED) >= 400
    assert counts(shards.eval_content_dir)[0] == {"val": 280 * len(CONTENT_SPLITS["eval"])}
    assert counts(shards.eval_style_dir)[0] == {"val": 50 * len(STYLE_SPLITS["eval"])}


def test_no_val_or_eval_image_in_training_shards(cache):
    """The split is by source image: the training shards' sources (their per-sample .json, in every dir
    training reads by default) hold no val or eval image, val and eval share none either, each set is
    exactly the documented list, v3's added images are in training only, and the v2 val/eval pixels stay."""
    shards = ensure_embedded(cache / VERSION)
    content, style = by_split(shards.content_dir), by_split(shards.style_dir)
    extra = by_split(shards.extra_content_dir), by_split(shards.extra_style_dir)
    assert set(extra[0]) == set(extra[1]) == {"train"}  # the added images have no val split at all
    train = content["train"] + style["train"] + extra[0]["train"] + extra[1]["train"]
    found = {
        "train": {n for n, _ in train},
        "val": {n for n, _ in content["val"] + style["val"]},
        "eval": {n for n, _ in by_split(shards.eval_content_dir)["val"] + by_split(shards.eval_style_dir)["val"]},
    }
    assert not found["train"] & found["val"]
    assert not found["train"] & found["eval"]
    assert not found["val"] & found["eval"]
    for name in ("train", "val", "eval"):
        assert found[name] == set(CONTENT_SPLITS[name]) | set(STYLE_SPLITS[name]), name
    assert {n for n, _ in extra[0]["train"] + extra[1]["train"]} == set(CONTENT_ADDED) | set(STYLE_ADDED)
    assert set(CONTENT_ADDED) | set(STYLE_ADDED) <= found["train"]
    assert found["val"] == V2_LISTS["val"] and found["eval"] == V2_LISTS["eval"]
    # the stereo pair is one scene: both halves on the same side of the split
    assert {"motorcycle_left.png", "motorcycle_right.png"} <= found["train"]
    # and the pixels differ too, not only the names (no crop of a held-out image hides under a train name)
    train_px = {px for _, px in train}
    held_px = {px for _, px in content["val"] + style["val"]}
    held_px |= {px for _, px in by_split(shards.eval_content_dir)["val"] + by_split(shards.eval_style_dir)["val"]}
    assert not train_px & held_px
    # the default training streams read the extra dirs, the val streams do not
    c_urls, s_urls, _ = stream_urls(DataConfig(content=shards.train_content, style=shards.train_style), "train")
    assert any(u.startswith(str(shards.extra_content_dir)) for u in c_urls)
    assert any(u.startswith(str(shards.extra_style_dir)) for u in s_urls)
    c_urls, s_urls, _ = stream_urls(DataConfig(content=shards.train_content, style=shards.train_style), "val")
    assert not any("extra" in Path(u).parts for u in c_urls + s_urls)
    for sub, digest in V2_HELD_OUT.items():
        assert held_out_pixels(cache / VERSION / sub) == digest, sub


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


def test_intact_shards_are_hashed_once_until_one_changes(cache, monkeypatch):
    """The stamp of sizes and mtimes spares every later call the 72 MB of hashing; a changed shard
    (here only its mtime) is verified again, and only its dir is."""
    from stylegen.data import shardio

    root = cache / VERSION
    ensure_embedded(root)  # verified and stamped
    verified = []
    real = shardio.verify_shard
    monkeypatch.setattr(shardio, "verify_shard", lambda url, row, *a: verified.append(Path(url)) or real(url, row, *a))
    shards = ensure_embedded(root)
    assert verified == []
    shard = sorted(shards.style_dir.glob("*.tar"))[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    ensure_embedded(root)
    assert verified and {p.parent for p in verified} == {shards.style_dir}
    verified.clear()
    ensure_embedded(root)
    assert verified == []


def test_staged_sources_follow_the_lists(cache, monkeypatch):
    """The staged folders hold exactly the listed files: a file an earlier list staged is removed,
    so the shards never include it."""
    import stylegen.data.embedded as emb

    root = cache / VERSION
    stale = root / "src" / "content" / "train" / "camera.png"
    stale.symlink_to(emb.skimage_data_dir() / "camera.png")
    ensure_embedded(root)
    assert not stale.exists() and not stale.is_symlink()
    assert counts(root / "content")[0]["train"] == 280 * (len(CONTENT_SPLITS["train"]) - len(CONTENT_ADDED))


def test_default_config_loads_embedded(cache, monkeypatch):
    monkeypatch.setenv("STYLEGEN_CACHE", str(cache))
    loader = build_loader(DataConfig(batch_size=8, steps_per_epoch=3), rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (8, 3, 64, 64)
    assert batches[0][0].float().std() > 10  # real photos, not blank
    c, s = load_pairs(DataConfig(), 4)
    assert c.shape == s.shape == (4, 3, 64, 64) and c.dtype == torch.uint8 and not torch.equal(c, s)
