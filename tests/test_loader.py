"""Loader: exact batch counts per rank and worker, different samples per rank, corrupt samples counted,
shard-list resolution, fixed validation pairs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from stylegen.config import DataConfig
from stylegen.data import shardio
from stylegen.data.loader import build_loader, load_pairs, resolve_shards
from stylegen.errors import UserError


def write_shards(out, counts: list[int], *, split="train", start=0, encoding="raw", base=0):
    """Shards whose sample i is a constant image of value (base + i) % 256 in channel 0 and i // 256 in
    channel 1, so every sample is identifiable. Returns all values written."""
    rows, ids, i = [], [], start
    for j, n in enumerate(counts):
        mem = []
        for _ in range(n):
            arr = np.zeros((64, 64, 3), np.uint8)
            arr[..., 0], arr[..., 1] = (base + i) % 256, (base + i) // 256
            if encoding == "raw":
                mem.append((f"{i:09d}.rgb8", arr.tobytes()))
            else:
                import io

                from PIL import Image

                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "PNG")
                mem.append((f"{i:09d}.png", buf.getvalue()))
            mem.append((f"{i:09d}.json", b"{}"))
            ids.append(base + i)
            i += 1
        data = shardio.tar_bytes(mem)
        name = shardio.shard_name(split, j)
        (out / name).write_bytes(data)
        rows.append({"file": name, "split": split, "samples": n, "bytes": len(data),
                     "sha256": shardio.sha256_bytes(data), "encoding": encoding})
    return rows, ids


def make_dir(tmp_path, name, train: list[int], val: list[int] = (), encoding="raw", base=0):
    d = tmp_path / name
    d.mkdir()
    rows, ids = write_shards(d, train, encoding=encoding, base=base)
    vrows, vids = write_shards(d, list(val), split="val", start=len(ids), encoding=encoding, base=base)
    shardio.write_manifest(d, rows + vrows, {"fingerprint": "test"})
    return d, ids, vids


def ids_of(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0, 0, 0].long() + 256 * batch[:, 1, 0, 0].long()).tolist()


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"batch_size": 4, "steps_per_epoch": 7, "shuffle_shards": 2, "hflip": False, **kw})


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_round_trip_shapes_dtype_and_values(tmp_path, encoding):
    d, ids, _ = make_dir(tmp_path, "c", [10, 10], encoding=encoding)
    s, sids, _ = make_dir(tmp_path, "s", [10], encoding=encoding, base=500)
    loader = build_loader(cfg(content=[str(d)], style=[str(s)]), rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 7
    for c, st in batches:
        assert c.shape == st.shape == (4, 3, 64, 64) and c.dtype == st.dtype == torch.uint8
        assert set(ids_of(c)) <= set(ids) and set(ids_of(st)) <= set(sids)
        assert (c[:, 2] == 0).all() and (c[:, 0] == c[:, 0, :1, :1]).all()  # whole image decoded
    assert loader.skipped == 0


def test_two_ranks_uneven_shards_equal_counts_different_samples(tmp_path):
    d, ids, _ = make_dir(tmp_path, "c", [13, 2, 7, 1, 9])  # 5 uneven shards over 2 ranks
    seen = []
    for rank in (0, 1):
        loader = build_loader(cfg(content=[str(d)], steps_per_epoch=11), rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == 11
        seen.append({i for c, _ in batches for i in ids_of(c)})
    # split_by_node gives rank 0 shards 0, 2, 4 and rank 1 shards 1, 3: disjoint samples
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[1] <= set(ids[13:15]) | set(ids[22:23])


def test_rank_from_env_as_under_ray(tmp_path, monkeypatch):
    d, ids, _ = make_dir(tmp_path, "c", [5, 5])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    got = {i for c, _ in build_loader(cfg(content=[str(d)])) for i in ids_of(c)}
    assert got <= set(ids[5:])


def test_dataloader_workers_exact_count_and_distinct_streams(tmp_path):
    d, ids, _ = make_dir(tmp_path, "c", [8, 8, 8, 8])
    loader = build_loader(cfg(content=[str(d)], num_workers=2, steps_per_epoch=9), rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == 9
    # workers read disjoint shards (0,2 vs 1,3): consecutive batches come from different workers
    first, second = set(ids_of(batches[0][0])), set(ids_of(batches[1][0]))
    assert first.isdisjoint(second)
    assert len(list(loader)) == 9  # a second epoch


def test_empty_style_uses_content_with_other_seed(tmp_path):
    d, ids, _ = make_dir(tmp_path, "c", [20, 20])
    batches = list(build_loader(cfg(content=[str(d)], shuffle_shards=8), rank=0, world_size=1))
    assert any(ids_of(c) != ids_of(s) for c, s in batches)
    assert {i for _, s in batches for i in ids_of(s)} <= set(ids)


def test_same_seed_same_batches_and_epochs_differ(tmp_path):
    d, _, _ = make_dir(tmp_path, "c", [10, 10, 10])
    a = build_loader(cfg(content=[str(d)], seed=3), rank=0, world_size=1)
    b = build_loader(cfg(content=[str(d)], seed=3), rank=0, world_size=1)
    ea, eb = [ids_of(c) for c, _ in a], [ids_of(c) for c, _ in b]
    assert ea == eb
    assert [ids_of(c) for c, _ in a] != ea  # next epoch reshuffles


def test_hflip_flips_some_images(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :32] = 200  # left half bright
    mem = []
    for i in range(30):
        mem += [(f"{i:09d}.rgb8", arr.tobytes()), (f"{i:09d}.json", b"{}")]
    (d / "train-000000.tar").write_bytes(shardio.tar_bytes(mem))
    left = [bool(c[k, 0, 0, 0] == 200) for c, _ in build_loader(cfg(content=[str(d)], hflip=True), rank=0,
                                                                 world_size=1) for k in range(4)]
    assert any(left) and not all(left)


def test_corrupt_samples_skipped_and_counted(tmp_path):
    import io

    from PIL import Image

    d = tmp_path / "c"
    d.mkdir()
    good = np.full((64, 64, 3), 9, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(good).save(buf, "PNG")
    png = buf.getvalue()
    mem = [("000000000.png", png[:-30]),            # truncated png
           ("000000001.rgb8", b"short"),             # wrong raw length
           ("000000002.json", b"{}"),                # no image member
           ("000000003.png", b"not a png at all")]
    mem += [(f"{i:09d}.png", png) for i in range(4, 10)]
    (d / "train-000000.tar").write_bytes(shardio.tar_bytes(mem))
    (d / "train-000001.tar").write_bytes(shardio.tar_bytes([("000000100.png", png)])[:700])  # truncated tar
    loader = build_loader(cfg(content=[str(d)], style=[str(d)], steps_per_epoch=5), rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == 5 and all((c == 9).all() and (s == 9).all() for c, s in batches)
    assert loader.skipped >= 4


def test_resolve_shards_forms(tmp_path):
    d, _, _ = make_dir(tmp_path, "c", [2, 2, 2], val=[2])
    assert [p.rsplit("/", 1)[1] for p in resolve_shards([str(d)], "train")] == \
        ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [p.rsplit("/", 1)[1] for p in resolve_shards([str(d)], "val")] == ["val-000000.tar"]
    assert len(resolve_shards([str(d / "train-{000000..000001}.tar")], "train")) == 2
    assert len(resolve_shards([str(d / "*.tar")], "train")) == 4
    assert len(resolve_shards([str(d / "val-000000.tar")], "train")) == 1
    with pytest.raises(UserError, match="does not exist"):
        resolve_shards([str(tmp_path / "nope")], "train")
    with pytest.raises(UserError, match="matches no files"):
        resolve_shards([str(tmp_path / "x*.tar")], "train")


def test_load_pairs_fixed_val_and_train_fallback(tmp_path, caplog):
    d, ids, vids = make_dir(tmp_path, "c", [10, 10], val=[6])
    c1, s1 = load_pairs(cfg(content=[str(d)]), 3)
    c2, s2 = load_pairs(cfg(content=[str(d)]), 3)
    assert c1.shape == (3, 3, 64, 64) and c1.dtype == torch.uint8 and c1.is_contiguous()
    assert torch.equal(c1, c2) and torch.equal(s1, s2)
    assert set(ids_of(c1)) | set(ids_of(s1)) <= set(vids)  # held-out split
    assert not set(ids_of(c1)) & set(ids_of(s1))
    t, _, _ = make_dir(tmp_path, "t", [10])
    with caplog.at_level(logging.WARNING):
        c, _ = load_pairs(cfg(content=[str(t)]), 4)
    assert "no 'val' shards" in caplog.text and set(ids_of(c)) <= set(range(10))


# ----------------------------------------------------------------------------- positions (exact resume)

@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_resumed_mid_epoch_yields_exactly_the_rest_without_decoding_the_skipped(tmp_path, monkeypatch,
                                                                                         workers):
    from stylegen.data import loader as L

    d, _, _ = make_dir(tmp_path, "c", [6] * 10)
    s, _, _ = make_dir(tmp_path, "s", [6] * 4, base=500)
    c = cfg(content=[str(d)], style=[str(s)], steps_per_epoch=9, num_workers=workers, hflip=True)
    full = build_loader(c, rank=0, world_size=1, epoch_seed=2)
    ref = [(a.clone(), b.clone()) for a, b in full]
    first = build_loader(c, rank=0, world_size=1, epoch_seed=2)
    it = iter(first)
    for _ in range(5):
        next(it)
    saved = first.state()
    assert (saved.epoch, saved.batch) == (2, 5)
    decoded = []
    real = L.decode_into
    monkeypatch.setattr(L, "decode_into", lambda out, ext, payload, flip: decoded.append(1) or real(out, ext, payload,
                                                                                                    flip))
    rest = [(a.clone(), b.clone()) for a, b in build_loader(c, rank=0, world_size=1, epoch_seed=2, resume=saved)]
    assert len(rest) == 4
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(rest, ref[5:]))
    if workers == 0:  # in-process: the decodes are countable; the skipped 5 batches were never decoded
        assert len(decoded) == 2 * 4 * 4  # content + style, 4 batches of 4


def test_epoch_sampling_sees_every_sample_once_with_equal_batches_per_rank(tmp_path):
    d, ids, _ = make_dir(tmp_path, "c", [7, 5, 9, 4, 6])  # 31 samples over 5 uneven shards
    c = cfg(content=[str(d)], sampling="epoch", steps_per_epoch=999)
    seen, counts = [], []
    for rank in (0, 1):
        loader = build_loader(c, rank=rank, world_size=2)
        got = [ids_of(b) for b, _ in loader]
        counts.append(len(got))
        seen += [i for b in got for i in b]
    assert counts[0] == counts[1] == len(loader)  # equal per rank (DDP never waits on a short rank)
    assert len(seen) == len(set(seen))  # exactly once: nothing repeated within the epoch
    assert set(seen) <= set(ids) and len(seen) == 2 * counts[0] * 4
    # rank 0 holds shards 0, 2, 4 (22 samples -> 5 batches), rank 1 shards 1, 3 (9 -> 2): both take 2
    assert counts[0] == 2


def test_epoch_sampling_needs_a_manifest(tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    write_shards(d, [4, 4])
    with pytest.raises(UserError, match="needs shard dirs with a manifest"):
        build_loader(cfg(content=[str(d)], sampling="epoch"), rank=0, world_size=1)
