"""TFRecord shards: writer, streaming per-process reader, corrupt records, make_shards CLI."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from kd_jax.data import make_shards, shards  # noqa: E402


def _images(n, h=9, w=7, c=3, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, c)).astype(np.uint8)


def _read_all(pattern, **kw):
    return sorted(shards.iter_numpy(shards.read_shards(pattern, **kw)), key=lambda e: e["id"])


def test_roundtrip_png_ids_labels_sources(tmp_path):
    n = 37
    imgs = _images(n)
    labels = np.arange(n) % 5
    sources = [f"src{i % 3}" for i in range(n)]
    man = shards.write_shards(tmp_path, imgs, labels=labels, sources=sources, num_shards=4)

    names = sorted(os.listdir(tmp_path))
    assert names == [f"pool-0000{i}-of-00004.tfrecord" for i in range(4)] + ["pool.json"]
    assert man == json.loads((tmp_path / "pool.json").read_text())
    assert man["count"] == n and man["shard_counts"] == [10, 9, 9, 9]
    assert man["image_shape"] == [9, 7, 3] and man["has_labels"]
    assert man["sources"] == {"src0": 13, "src1": 12, "src2": 12}

    pattern = shards.shard_pattern(tmp_path)
    out = _read_all(pattern)
    assert [e["id"] for e in out] == list(range(n))
    for e in out:
        i = e["id"]
        assert e["image"].dtype == np.uint8 and e["image"].tobytes() == imgs[i].tobytes()
        assert e["label"] == labels[i] and e["source"] == sources[i]
    ds = shards.read_shards(pattern)
    assert ds.element_spec["image"].shape.as_list() == [9, 7, 3]  # static, from the manifest
    assert shards.count_records(pattern) == n
    assert shards.count_records(pattern, use_manifest=False) == n
    assert sorted(shards.read_ids(pattern)) == list(range(n))


def test_unlabeled_custom_ids_gray_and_jpeg(tmp_path):
    imgs = _images(6, 16, 16, 1)
    ids = np.array([50, 3, 9, 11, 7, 100])
    shards.write_shards(tmp_path / "p", imgs[..., 0], ids=ids, num_shards=2)
    out = _read_all(shards.shard_pattern(tmp_path / "p"))
    assert [e["id"] for e in out] == sorted(ids)
    assert all(e["label"] == -1 and e["source"] == "" for e in out)
    by_id = {e["id"]: e["image"] for e in out}
    for i, id_ in enumerate(ids):
        np.testing.assert_array_equal(by_id[id_], imgs[i])

    smooth = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (3, 16, 1, 3))
    man = shards.write_shards(tmp_path / "j", smooth, num_shards=1, image_format="jpeg")
    assert man["image_format"] == "jpeg"
    (e,) = _read_all(shards.shard_pattern(tmp_path / "j"), channels=3)[:1]
    assert e["image"].shape == (16, 16, 3)
    assert np.abs(e["image"].astype(int) - smooth[0]).max() <= 8
    resized = _read_all(shards.shard_pattern(tmp_path / "j"), image_size=8)
    assert resized[0]["image"].shape == (8, 8, 3) and resized[0]["image"].dtype == np.uint8


@pytest.mark.parametrize("count", [2, 3])
def test_process_shares_disjoint_and_complete(tmp_path, count):
    n = 50
    shards.write_shards(tmp_path, _images(n), num_shards=6)
    pattern = shards.shard_pattern(tmp_path)
    shares = [
        [e["id"] for e in _read_all(pattern, process_index=i, process_count=count)]
        for i in range(count)
    ]
    flat = [i for s in shares for i in s]
    assert len(flat) == len(set(flat)) == n and set(flat) == set(range(n))
    for i, share in enumerate(shares):
        assert sorted(shards.read_ids(pattern, process_index=i, process_count=count)) == share
        assert shards.count_ids(pattern, process_index=i, process_count=count) == len(share)
    # File level: process i reads sorted files i, i+P, ...
    files = sorted(tf.io.gfile.glob(pattern))
    assert shards.process_files(pattern, 1, count) == files[1::count]


def test_shuffle_files_keep_ids_and_count_ids(tmp_path):
    shards.write_shards(tmp_path, _images(40), num_shards=5)
    pattern = shards.shard_pattern(tmp_path)
    a = [
        e["id"] for e in shards.iter_numpy(shards.read_shards(pattern, shuffle_files=True, seed=3))
    ]
    b = [
        e["id"] for e in shards.iter_numpy(shards.read_shards(pattern, shuffle_files=True, seed=3))
    ]
    assert a == b and sorted(a) == list(range(40))
    keep = lambda i: tf.equal(i % 4, 0)  # noqa: E731
    kept = _read_all(pattern, keep_id_fn=keep)
    assert [e["id"] for e in kept] == list(range(0, 40, 4))
    assert shards.count_ids(pattern, keep_id_fn=keep) == 10


def test_bad_patterns_and_process_counts(tmp_path):
    missing = str(tmp_path / "nothing-*.tfrecord")
    with pytest.raises(ValueError, match="nothing-"):
        shards.read_shards(missing)
    with pytest.raises(ValueError, match="nothing-"):
        shards.count_records(missing)
    shards.write_shards(tmp_path, _images(5), num_shards=2)
    with pytest.raises(ValueError, match="3 processes"):
        shards.read_shards(shards.shard_pattern(tmp_path), process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        shards.read_shards(shards.shard_pattern(tmp_path), process_index=2, process_count=2)


def test_directory_opens_the_shards_its_manifest_lists(tmp_path):
    shards.write_shards(tmp_path / "pool", _images(13), num_shards=3)
    (tmp_path / "pool" / "notes.txt").write_text("not a shard")
    listed = shards.list_shard_files(tmp_path / "pool")
    assert [os.path.basename(f) for f in listed] == [
        f"pool-0000{i}-of-00003.tfrecord" for i in range(3)
    ]
    assert shards.count_records(tmp_path / "pool") == 13
    assert sorted(shards.read_ids(str(tmp_path / "pool"))) == list(range(13))
    assert len(_read_all(str(tmp_path / "pool"))) == 13
    assert shards.image_shape(str(tmp_path / "pool")) == (9, 7, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*without a shard manifest"):
        shards.list_shard_files(tmp_path / "empty")


def test_foreign_file_in_a_glob_skipped_by_every_pass(tmp_path, caplog):
    shards.write_shards(tmp_path, _images(10), num_shards=2)
    pattern, manifest = str(tmp_path / "*"), str(tmp_path / "pool.json")
    for count in (
        lambda: shards.count_records(pattern),
        lambda: shards.count_ids(pattern),
        lambda: len(shards.read_ids(pattern)),
        lambda: len(_read_all(pattern)),
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kd_jax.data.shards"):
            assert count() == 10
        assert any(manifest in r.getMessage() for r in caplog.records)
    with pytest.raises(tf.errors.InvalidArgumentError, match="pool.json"):
        _read_all(pattern, on_corrupt="fail")


def test_corrupt_record_skipped_counted_or_fails(tmp_path, caplog):
    imgs = _images(6)
    bad_file = str(tmp_path / "mixed-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(bad_file) as w:
        for i in range(6):
            w.write(shards.make_example(shards.encode_image(imgs[i]), i))
            if i == 2:
                w.write(shards.make_example(b"\x89PNG not really a png", 99))
    stats = shards.ReadStats()
    with caplog.at_level(logging.WARNING, logger="kd_jax.data.shards"):
        out = _read_all(bad_file, stats=stats)
    assert [e["id"] for e in out] == list(range(6))
    assert stats.skipped == 1 and stats.by_file == {bad_file: 1}
    assert any(bad_file in r.getMessage() for r in caplog.records)
    with pytest.raises(tf.errors.InvalidArgumentError, match="mixed-00000-of-00001"):
        _read_all(bad_file, on_corrupt="fail")


def test_truncated_shard_counted_as_read(tmp_path):
    shards.write_shards(tmp_path, _images(20), num_shards=2)
    f = tmp_path / "pool-00001-of-00002.tfrecord"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # a file cut short: TF just sees fewer records
    stats = shards.ReadStats()
    out = _read_all(shards.shard_pattern(tmp_path), stats=stats)
    assert len(out) + stats.skipped == 20 and stats.skipped >= 5
    assert list(stats.by_file) == [str(f)]
    # The count no longer trusts the manifest for the cut file: it is what training reads.
    assert shards.count_records(shards.shard_pattern(tmp_path)) == len(out)


def test_writer_refuses_existing_overwrites_and_leaves_no_partial(tmp_path):
    shards.write_shards(tmp_path, _images(10), num_shards=4)
    with pytest.raises(FileExistsError, match="overwrite"):
        shards.write_shards(tmp_path, _images(10), num_shards=4)
    shards.write_shards(tmp_path, _images(10), num_shards=2, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == [
        "pool-00000-of-00002.tfrecord",
        "pool-00001-of-00002.tfrecord",
        "pool.json",
    ]

    class Exploding:  # a lazy source that dies half way: nothing must look written
        def __len__(self):
            return 10

        def __getitem__(self, i):
            if i == 7:
                raise RuntimeError("killed")
            return _images(1)[0]

    with pytest.raises(RuntimeError):
        shards.write_shards(tmp_path / "k", Exploding(), num_shards=3)
    assert os.listdir(tmp_path / "k") == []
    with pytest.raises(ValueError, match="uint8"):
        shards.write_shards(tmp_path / "f", np.zeros((2, 4, 4), np.float32))


def test_make_shards_cli_npz(tmp_path, capsys):
    imgs = _images(12, 10, 10, 1)
    labels = np.arange(12) % 4
    src = np.array(["a"] * 5 + ["b"] * 7)
    np.savez(tmp_path / "d.npz", images=imgs[..., 0], labels=labels, source=src)
    out = tmp_path / "out"
    rc = make_shards.main(
        [f"--src={tmp_path / 'd.npz'}", f"--out={out}", "--num_shards=3", "--prefix=mine"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote 12 images to 3 shard(s)" in printed and "a=5, b=7" in printed
    man = shards.read_manifest(out, "mine")
    assert man["count"] == 12 and man["image_shape"] == [10, 10, 1]
    got = _read_all(str(out / "mine-*"))
    for e in got:
        assert e["image"].tobytes() == imgs[e["id"]].tobytes()
        assert e["label"] == labels[e["id"]] and e["source"] == src[e["id"]]

    rc = make_shards.main(
        [
            f"--src={tmp_path / 'd.npz'}",
            f"--out={out}",
            "--prefix=small",
            "--image_size=6",
            "--num_shards=2",
        ]
    )
    assert rc == 0 and shards.read_manifest(out, "small")["image_shape"] == [6, 6, 1]


def test_make_shards_cli_image_folder(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.RandomState(1)
    expected = {}
    for cls in ("zebra", "cat"):
        for k in range(3):
            (root / cls).mkdir(parents=True, exist_ok=True)
            arr = rng.randint(0, 256, (8, 8)).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{k}.png")
            expected[f"{cls}/{k}.png"] = arr
    out = tmp_path / "out"
    rc = make_shards.main(
        [f"--src={root}", f"--out={out}", "--num_shards=2", "--labels_from_folders"]
    )
    assert rc == 0
    assert "classes: 0=cat, 1=zebra" in capsys.readouterr().out
    man = shards.read_manifest(out)
    assert man["image_shape"] == [8, 8, 1] and man["sources"] == {"cat": 3, "zebra": 3}
    got = _read_all(shards.shard_pattern(out))
    order = sorted(expected)  # ids follow the sorted relative paths
    for e in got:
        rel = order[e["id"]]
        assert e["source"] == rel.split("/")[0]
        assert e["label"] == (0 if rel.startswith("cat") else 1)
        np.testing.assert_array_equal(e["image"][..., 0], expected[rel])

    rc = make_shards.main(
        [
            f"--src={root}",
            f"--out={out}",
            "--prefix=rgb",
            "--channels=3",
            "--image_size=4x6",
            "--num_shards=1",
        ]
    )
    assert rc == 0 and shards.read_manifest(out, "rgb")["image_shape"] == [4, 6, 3]


def test_make_shards_bad_inputs_name_file_and_key(tmp_path, capsys):
    np.savez(tmp_path / "nokey.npz", pictures=np.zeros((2, 4, 4), np.uint8))
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 4, 4), np.float32))
    np.savez(tmp_path / "rank.npz", images=np.zeros((4, 4), np.uint8))
    np.savez(
        tmp_path / "labels.npz",
        images=np.zeros((2, 4, 4), np.uint8),
        labels=np.zeros((3,), np.int64),
    )
    cases = {
        "nokey.npz": "missing key 'images'",
        "float.npz": "dtype float32",
        "rank.npz": "shape (4, 4)",
        "labels.npz": "key 'labels'",
        "absent.npz": "no such file",
    }
    for name, needle in cases.items():
        rc = make_shards.main([f"--src={tmp_path / name}", f"--out={tmp_path / 'o'}"])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and name in err, (name, err)
    with pytest.raises(make_shards.InputError, match="images"):
        make_shards.make_shards(str(tmp_path / "nokey.npz"), str(tmp_path / "o"))

    # The real command line, once (bad input fails before TensorFlow is imported: fast).
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd_jax.data.make_shards",
            f"--src={tmp_path / 'nokey.npz'}",
            f"--out={tmp_path / 'o'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "nokey.npz" in proc.stderr and "'images'" in proc.stderr


def test_pool_source_protocol(tmp_path):
    shards.write_shards(tmp_path, _images(9), num_shards=3)
    pool = shards.TFRecordPool(shards.shard_pattern(tmp_path))
    assert isinstance(pool, shards.PoolSource)
    assert len(pool) == 9 and list(pool.ids()) == list(range(9))
    ids = [e["id"] for e in shards.iter_numpy(pool.stream(process_index=1, process_count=3))]
    assert sorted(ids) == [1, 4, 7]
