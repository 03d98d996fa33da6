"""WebDataset shards: URL lists, the tar reader, sample counts, the exact split over ranks and
workers, deterministic order and resume, mixing weights, and bad samples counted by reason."""
import json
import tarfile
from collections import Counter

import pytest
import torch

from cliptrain.data.samples import BadSample
from cliptrain.data.shards import expand_braces, group_samples, iter_tar, parse_sources, shard_sizes
from cliptrain.data.streaming import ShardSamples, ShardSet, ShardStream, segment_pieces
from cliptrain.data.transforms import image_transform
from datafiles import build_bad_shards, micro_tokenizer, write_shards, write_tar


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPTRAIN_CACHE", str(tmp_path / "cache"))


def stream(spec, batch_size=12, **kw) -> ShardStream:
    shards = ShardSet(spec, kw.pop("weights", None), log=lambda _: None)
    return ShardStream(shards, image_transform(8, True), micro_tokenizer, batch_size, seed=kw.pop("seed", 3),
                       shuffle_buffer=kw.pop("shuffle_buffer", 10), **kw)


def epoch_ids(ds: ShardStream, epoch: int, rank: int, world: int, workers: int, start: int = 0) -> list[list[int]]:
    return [b.indices.tolist() for b in ds.loader(epoch, start, rank, world, workers)]


def test_brace_expansion():
    assert expand_braces("a/{000..003}.tar") == [f"a/{i:03d}.tar" for i in range(4)]
    assert expand_braces("{x,y}-{8..10}") == ["x-8", "x-9", "x-10", "y-8", "y-9", "y-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    sources = parse_sources("a/{0..1}.tar::pipe:cat b.tar", [1, 3])
    assert [s.urls for s in sources] == [["a/0.tar", "a/1.tar"], ["pipe:cat b.tar"]]
    assert [s.weight for s in sources] == [1.0, 3.0]
    with pytest.raises(ValueError, match="data.weights has 1 values but 'a::b' names 2 sources"):
        parse_sources("a::b", [1])


def test_tar_reader_equals_tarfile(tmp_path):
    long = "d" * 120 + "/x" * 30  # longer than the 100-byte name field: a PAX header carries it
    write_tar(tmp_path / "t.tar", [("a", {"jpg": b"123", "txt": b"x"}), (long, {"txt": b"y" * 700})])
    with tarfile.open(tmp_path / "t.tar") as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with open(tmp_path / "t.tar", "rb") as f:
        got = [(e.name, e.data) for e in iter_tar(f)]
    assert got == expected
    with open(tmp_path / "t.tar", "rb") as f:
        samples = list(group_samples(iter_tar(f)))
    assert [s["__key__"] for s in samples] == ["a", long]
    assert samples[0]["jpg"] == b"123" and samples[1]["txt"] == b"y" * 700


def test_sizes_from_sizes_json_stats_or_counted_and_cached(tmp_path):
    a = write_shards(tmp_path / "a", [3, 5], sizes_json=True)
    (tmp_path / "a" / "sizes.json").write_text(json.dumps({"shard-00000.tar": 3, "shard-00001.tar": 5}))
    assert shard_sizes(a) == [3, 5]
    b = write_shards(tmp_path / "b", [4, 2])
    (tmp_path / "b" / "shard-00000_stats.json").write_text(json.dumps({"successes": 4, "count": 9}))
    log = []
    assert shard_sizes(b, log=log.append) == [4, 2]
    assert log == ["counting the samples of 1 shards (once; the counts are cached)"]
    assert json.loads((tmp_path / "b" / "sizes.json").read_text()) == {"shard-00001.tar": 2}
    log.clear()
    assert shard_sizes(b, log=log.append) == [4, 2] and log == []  # cached: no second count
    with pytest.raises(FileNotFoundError, match="shard not found: .*nope-1.tar"):
        shard_sizes([str(tmp_path / "b" / "nope-1.tar")])


def test_segments_cover_the_stream_once():
    sizes = [5, 1, 7, 3]
    order = [2, 0, 3, 1]
    pieces = [p for start in range(0, 16, 4) for p in segment_pieces(order, sizes, start, 4)]
    covered = [(s, j) for s, lo, hi in pieces for j in range(lo, hi)]
    assert sorted(covered) == sorted((s, j) for s in range(4) for j in range(sizes[s]))


def test_every_sample_once_per_epoch_over_2_ranks_and_3_workers(tmp_path):
    paths = write_shards(tmp_path, [10, 7, 13, 9, 11], sizes_json=True)   # 50 samples, 5 shards < 2 x 3 slots
    ds = stream(f"{tmp_path}/shard-{{00000..00004}}.tar", batch_size=10)
    assert len(paths) == 5 and len(ds) == 50 and ds.steps_per_epoch == 5
    for epoch in (0, 1):
        per_rank = [epoch_ids(ds, epoch, rank, 2, 3) for rank in (0, 1)]
        assert all(len(batches) == 5 and all(len(b) == 5 for b in batches) for batches in per_rank)
        seen = Counter(i for batches in per_rank for b in batches for i in b)
        assert sorted(seen) == list(range(50)) and set(seen.values()) == {1}
    # The order changes between epochs and is a pure function of (seed, epoch).
    assert epoch_ids(ds, 0, 0, 2, 3) != epoch_ids(ds, 1, 0, 2, 3)
    assert epoch_ids(ds, 1, 1, 2, 3) == epoch_ids(ds, 1, 1, 2, 3)


def test_incomplete_last_batch_is_dropped_not_duplicated(tmp_path):
    write_shards(tmp_path, [9, 8])
    ds = stream(str(tmp_path), batch_size=4)
    ids = [i for b in epoch_ids(ds, 0, 0, 1, 2) for i in b]
    assert len(ids) == 16 and len(set(ids)) == 16 and set(ids) <= set(range(17))


@pytest.mark.parametrize("world,workers", [(1, 2), (2, 3)])
def test_mid_epoch_resume_gives_the_same_batches(tmp_path, world, workers):
    write_shards(tmp_path, [12, 9, 15], sizes_json=True)
    ds = stream(str(tmp_path), batch_size=6)
    for rank in range(world):
        full = list(ds.loader(1, 0, rank, world, workers))
        for start in (1, 4):
            resumed = list(ds.loader(1, start, rank, world, workers))
            assert [b.indices.tolist() for b in resumed] == [b.indices.tolist() for b in full[start:]]
            assert all(torch.equal(a.images, b.images) for a, b in zip(resumed, full[start:]))  # same crops


def test_mixing_weights_are_the_sample_proportions(tmp_path):
    write_shards(tmp_path / "a", [20, 30], prefix="a", sizes_json=True)
    write_shards(tmp_path / "b", [7, 7, 9], prefix="b", start=1000, sizes_json=True)
    ds = stream(f"{tmp_path}/a::{tmp_path}/b", weights=(1, 3), resampled=True, samples_per_epoch=10_000)
    ids = [item["__id__"] for item in ds.slot_items(0, 0, 1, 0, 1)]
    assert len(ids) == 10_000 - 10_000 % 12
    from_b = sum(i >= 50 for i in ids) / len(ids)   # ids 0..49 are source a's
    assert abs(from_b - 0.75) / 0.75 < 0.05
    with pytest.raises(ValueError, match="data.weights mixes sources by sampling: set data.resampled true"):
        stream(f"{tmp_path}/a::{tmp_path}/b", weights=(1, 3))


def test_resampled_mode_is_deterministic_and_sized(tmp_path):
    write_shards(tmp_path, [5, 6])
    ds = stream(str(tmp_path), resampled=True, samples_per_epoch=48, batch_size=8)
    assert ds.steps_per_epoch == 6
    a, b = epoch_ids(ds, 2, 0, 1, 2), epoch_ids(ds, 2, 0, 1, 2)
    assert a == b and len(a) == 6
    assert epoch_ids(ds, 2, 0, 1, 2, start=3) == a[3:]


def test_bad_samples_are_counted_by_reason_and_replaced(tmp_path):
    spec, good, expected, total = build_bad_shards(tmp_path)
    ds = stream(spec, batch_size=total, max_pixels=100_000)   # the whole epoch in one batch
    batches = list(ds.loader(0, 0, 0, 1, 0))
    assert len(batches) == 1 and len(batches[0]) == total       # shapes unchanged
    reasons = Counter(reason for b in batches for reason, _, _ in b.bad)
    assert reasons == expected
    ids = set(batches[0].indices.tolist())
    assert set(good) | set(range(total - 6, total - 3)) <= ids   # no good sample lost (ids = positions)
    captions = {int(c) for c in batches[0].texts[:, 0].tolist()}
    assert {100, 101, 102} <= captions


def test_validation_shards_keep_only_readable_samples(tmp_path):
    from cliptrain.data import readable_only
    spec, good, expected, total = build_bad_shards(tmp_path)
    samples = ShardSamples(spec, max_pixels=100_000, log=lambda _: None)
    log = []
    kept = readable_only(samples, "val", log.append)
    assert len(kept) == total - sum(expected.values())
    assert log[0].startswith(f"val: skipped {len(samples) - len(kept)} of {len(samples)} samples")
    for k in range(len(kept)):
        kept[k]
    with pytest.raises(BadSample):
        samples[1]


def test_pipe_and_file_urls(tmp_path):
    write_shards(tmp_path, [4, 4], sizes_json=True)
    a = stream(f"pipe:cat {tmp_path}/shard-00000.tar::file://{tmp_path}/shard-00001.tar", batch_size=4)
    assert sorted(i for b in epoch_ids(a, 0, 0, 1, 0) for i in b) == list(range(8))


def test_http_shards_with_remote_sizes_json(tmp_path):
    import functools
    import http.server
    import threading
    write_shards(tmp_path / "www", [5, 7], sizes_json=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{00000..00001}}.tar"
        log = []
        shards = ShardSet(url, log=log.append)
        assert shards.sizes == [5, 7] and log == []      # read from the server's sizes.json, nothing counted
        ds = ShardStream(shards, image_transform(8, True), micro_tokenizer, 4)
        assert sorted(i for b in epoch_ids(ds, 0, 0, 1, 0) for i in b) == list(range(12))
    finally:
        server.shutdown()


def test_shard_workers_persist_across_epochs(tmp_path):
    import os
    write_shards(tmp_path, [12, 12], sizes_json=True)
    ds = stream(str(tmp_path), batch_size=6)
    fresh = stream(str(tmp_path), batch_size=6)
    loader = ds.loader(0, 0, 0, 1, 2)
    first = [b.indices.tolist() for b in loader]
    pids = loader._iterator._workers[0].pid if loader._iterator is not None else None
    again = ds.loader(1, 1, 0, 1, 2)
    assert again is loader
    second = [b.indices.tolist() for b in again]
    assert loader._iterator._workers[0].pid == pids and pids != os.getpid()   # the same worker processes
    assert first == epoch_ids(fresh, 0, 0, 1, 2) and second == epoch_ids(fresh, 1, 0, 1, 2, start=1)


def test_dropping_a_stream_stops_its_workers_at_once(tmp_path):
    # No reference cycle holds the workers: they stop when the last reference goes, not at a later garbage
    # collection (where torch's shutdown would wait 5 s per worker for queues already closed).
    import gc
    write_shards(tmp_path, [12, 12], sizes_json=True)
    ds = stream(str(tmp_path), batch_size=6)
    loader = ds.loader(0, 0, 0, 1, 2)
    assert len(list(loader)) == 4
    workers = list(loader._iterator._workers)
    assert all(w.is_alive() for w in workers)
    gc.disable()
    try:
        del ds, loader
        assert not any(w.is_alive() for w in workers)
    finally:
        gc.enable()


def test_validation_shards_capped_by_eval_max_samples_read_only_the_shards_they_need(tmp_path):
    from pathlib import Path

    from cliptrain.base.config import load_config
    from cliptrain.training.build.data import build_sources
    paths = write_shards(tmp_path / "val", [10, 10, 10], sizes_json=True)
    Path(paths[2]).write_bytes(b"not a tar at all")  # never opened when 12 samples are enough
    spec = str(tmp_path / "val" / "shard-{00000..00002}.tar")
    cfg = load_config(None, {"data": {"source": "shards", "train_path": spec, "val_path": spec},
                             "eval": {"max_samples": 12}})
    log = []
    _, val, _ = build_sources(cfg, 32, train=False, log=log.append)
    assert log == [f"{spec}: the first 12 of its 30 samples (eval.max_samples)"]
    assert len(val) == 12
    assert [val[i][1] for i in range(12)] == [f"sample {i}" for i in range(12)]
    with pytest.raises(IndexError):
        val[12]


def test_a_capped_table_keeps_its_first_rows(tmp_path):
    from cliptrain.data.sources import open_source
    from datafiles import image_bytes
    rows = ["image,caption"]
    for i in range(8):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes(i))
        rows.append(f"{i}.jpg,caption {i}")
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    log = []
    source = open_source("table", str(tmp_path / "val.csv"), False, log=log.append, limit=5)
    assert len(source) == 5 and [source[i][1] for i in range(5)] == [f"caption {i}" for i in range(5)]
    assert log == [f"{tmp_path / 'val.csv'}: the first 5 of its 8 samples (eval.max_samples)"]
    assert len(open_source("table", str(tmp_path / "val.csv"), False, log=log.append, limit=50)) == 8
