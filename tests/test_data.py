"""Tests for vqgen.data: sources, grain pipelines, sharding, resumable iterator state."""
import hashlib
import json
import logging
import pickle

import numpy as np
import pytest

from vqgen import data
from vqgen.data import embedded, sources


def _take(it, k):
    return [next(it) for _ in range(k)]


def _digest(image):
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


# ------------------------------------------------------------------------------------- mnist
@pytest.fixture(scope="module")
def mnist_train():
    return data.make_source("mnist", "train", image_size=32)


@pytest.fixture(scope="module")
def mnist_test():
    return data.make_source("mnist", "test", image_size=32)


def test_mnist_train_batches(mnist_train):
    it = data.make_pipeline(
        mnist_train, global_batch_size=8, seed=0, train=True, random_crop=True, random_flip=True,
        process_index=0, process_count=1,
    )
    for batch in _take(it, 2):
        assert batch["image"].shape == (8, 32, 32, 1) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
        assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
        assert batch["image"].min() == -1.0 and batch["image"].max() > 0.5  # real digits, not blank
        assert set(batch["label"].tolist()) <= set(range(10))


def test_eval_pipeline_is_one_ordered_pass_without_augmentation(mnist_test):
    images, labels = embedded.load_mnist("test")
    it = data.make_pipeline(
        mnist_test, global_batch_size=64, seed=0, train=False, drop_remainder=False,
        random_crop=True, random_flip=True, process_index=0, process_count=1,
    )
    batches = list(it)
    assert [len(b["label"]) for b in batches] == [64] * 7 + [500 - 7 * 64]
    got = np.concatenate([b["image"] for b in batches])
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels)
    np.testing.assert_allclose(got, images.astype(np.float32) / 127.5 - 1.0, atol=1e-6)
    arrays = data.eval_arrays(mnist_test, max_examples=100)
    assert arrays["image"].shape == (100, 32, 32, 1) and arrays["label"].dtype == np.int32
    np.testing.assert_array_equal(arrays["image"], got[:100])


def test_mnist_resize(mnist_test):
    small = data.make_source("mnist", "test", image_size=16)
    assert small[0]["image"].shape == (16, 16, 1) and small[0]["image"].dtype == np.uint8
    # The digit's mean brightness survives a 2x bilinear downscale.
    big = mnist_test[0]["image"].astype(np.float64)
    assert abs(small[0]["image"].mean() - big.mean()) < 0.1 * big.mean()


def test_determinism_per_seed(mnist_train):
    def batches(seed):
        it = data.make_pipeline(
            mnist_train, global_batch_size=4, seed=seed, train=True, random_crop=True, random_flip=True,
            process_index=0, process_count=1,
        )
        return _take(it, 3)

    _assert_batches_equal(batches(1), batches(1))
    a, b = batches(1), batches(2)
    assert not np.array_equal(a[0]["image"], b[0]["image"])


def test_per_host_shards_are_disjoint_and_cover(mnist_test):
    n = len(mnist_test)
    digests = {_digest(mnist_test[i]["image"]) for i in range(n)}
    assert len(digests) == n  # every test digit is distinct, so digests identify examples
    seen = []
    for p in range(2):
        it = data.make_pipeline(
            mnist_test, global_batch_size=20, seed=0, train=False, drop_remainder=False,
            process_index=p, process_count=2,
        )
        images = np.concatenate([b["image"] for b in it])
        assert len(images) == n // 2
        seen.append({_digest(((x + 1.0) * 127.5).round().astype(np.uint8)) for x in images})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == digests

    # Training: one epoch of process 0's shuffled stream is exactly its slice.
    it = data.make_pipeline(
        mnist_test, global_batch_size=20, seed=3, train=True, process_index=0, process_count=2
    )
    images = np.concatenate([b["image"] for b in _take(it, n // 20)])
    assert {_digest(((x + 1.0) * 127.5).round().astype(np.uint8)) for x in images} == seen[0]


def test_batch_not_divisible_by_process_count(mnist_test):
    with pytest.raises(ValueError, match="not a positive multiple of the process count 3"):
        data.make_pipeline(mnist_test, global_batch_size=8, seed=0, train=True, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        data.make_pipeline(mnist_test, global_batch_size=8, seed=0, train=True, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="drop_remainder"):
        data.make_pipeline(mnist_test, global_batch_size=1024, seed=0, train=False, process_index=0, process_count=1)


def test_iterator_state_resumes_exactly(mnist_train):
    def make():
        return data.make_pipeline(
            mnist_train, global_batch_size=4, seed=7, train=True, random_crop=True, random_flip=True,
            process_index=0, process_count=1,
        )

    it = make()
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON (orbax stores it so)
    expected = _take(it, 3)
    resumed = make()
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 3), expected)
    fresh = make()
    assert not np.array_equal(_take(fresh, 1)[0]["image"], expected[0]["image"])


def test_iterator_state_through_orbax_composite(mnist_train, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    def make():
        return data.make_pipeline(
            mnist_train, global_batch_size=4, seed=5, train=True, random_flip=True, process_index=0, process_count=1
        )

    it = make()
    _take(it, 2)
    params = {"w": np.arange(6, dtype=np.float32)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(params), data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(
            1, args=ocp.args.Composite(state=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(make()))
        )
    np.testing.assert_array_equal(restored["state"]["w"], params["w"])
    _assert_batches_equal(_take(restored["data"], 2), expected)


def test_augment_flip_and_crop():
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, size=(3, 8, 8, 1), dtype=np.uint8)
    flip = data.Augment(random_crop=False, random_flip=True)
    flipped = 0
    for i in range(16):
        out = flip.random_map({"image": video, "label": np.int32(1)}, np.random.default_rng(i))["image"]
        if np.array_equal(out, video[:, :, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(out, video)
    assert 0 < flipped < 16
    crop = data.Augment(random_crop=True, random_flip=False)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    outs = [crop.random_map({"image": image, "label": 0}, np.random.default_rng(i))["image"] for i in range(8)]
    assert all(o.shape == (16, 16, 3) and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, image) for o in outs)


def test_sources_and_transforms_pickle(mnist_test):
    for obj in (mnist_test, data.make_source("skimage", "test", image_size=16)):
        clone = pickle.loads(pickle.dumps(obj))
        assert repr(clone) == repr(obj)
        np.testing.assert_array_equal(clone[3]["image"], obj[3]["image"])
    assert pickle.loads(pickle.dumps(data.Augment(True, True))).random_crop
    pickle.loads(pickle.dumps(data.ToFloat()))


def test_unknown_source_name():
    with pytest.raises(ValueError, match="unknown data source 'cifar'"):
        data.make_source("cifar", "train", image_size=32)
    with pytest.raises(ValueError, match="unknown split"):
        data.make_source("mnist", "validation", image_size=32)


# ------------------------------------------------------------------------------------- skimage
def test_skimage_crops():
    train = data.make_source("skimage", "train", image_size=32, seed=0)
    test = data.make_source("skimage", "test", image_size=32, seed=0)
    assert len(train) == 8192 and len(test) == 512
    test_ids = {sources.SKIMAGE_PHOTOS.index(p) for p in sources.SKIMAGE_TEST_PHOTOS}
    for i in range(4):
        r = test[i]
        assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8
        assert int(r["label"]) in test_ids and int(train[i]["label"]) not in test_ids
        # The crop is the photo region named by crop_box, downscaled: same mean colour.
        name, top, left, side = test.crop_box(i)
        region = sources.skimage_photo(name)[top : top + side, left : left + side].astype(np.float64)
        np.testing.assert_allclose(r["image"].mean((0, 1)), region.mean((0, 1)), atol=6.0)
    again = data.make_source("skimage", "test", image_size=32, seed=0)
    other = data.make_source("skimage", "test", image_size=32, seed=1)
    np.testing.assert_array_equal(again[5]["image"], test[5]["image"])
    assert not np.array_equal(other[5]["image"], test[5]["image"])
    it = data.make_pipeline(test, global_batch_size=4, seed=0, train=True, random_crop=True, random_flip=True,
                            process_index=0, process_count=1)
    assert next(it)["image"].shape == (4, 32, 32, 3)


# ------------------------------------------------------------------------------------- moving_mnist
def test_moving_mnist():
    src = data.make_source("moving_mnist", "test", image_size=32, num_frames=8, seed=0)
    _, test_labels = embedded.load_mnist("test")
    assert len(src) == len(test_labels)
    limit = 32 - src.digit_size
    assert src.digit_size == 16
    num_single, num_double = 0, 0
    for i in range(12):
        r = src[i]
        video = r["image"]
        assert video.shape == (8, 32, 32, 1) and video.dtype == np.uint8
        assert int(r["label"]) == test_labels[i]
        digits, pos = src.plan(i)
        assert digits[0] == i and pos.shape == (len(digits), 8, 2)
        assert pos.min() >= 0 and pos.max() <= limit
        assert np.abs(np.diff(pos, axis=1)).max() <= 3  # at most 2 px/frame, plus rounding
        assert (np.abs(np.diff(pos, axis=1)).sum(-1) > 0).any()  # digits move
        if len(digits) == 1:
            num_single += 1
            ink = src._digits[i].astype(np.int64).sum()
            # Nothing was cut off at the canvas edge: every frame holds all of the digit's ink,
            # exactly where the plan puts it.
            np.testing.assert_array_equal(video.reshape(8, -1).astype(np.int64).sum(-1), ink)
            for t in range(8):
                r0, c0 = pos[0, t]
                np.testing.assert_array_equal(video[t, r0 : r0 + 16, c0 : c0 + 16], src._digits[i])
        else:
            num_double += 1
    assert num_single and num_double
    again = data.make_source("moving_mnist", "test", image_size=32, num_frames=8, seed=0)
    np.testing.assert_array_equal(again[3]["image"], src[3]["image"])
    train = data.make_source("moving_mnist", "train", image_size=32, num_frames=8, seed=0)
    assert len(train) == len(embedded.load_mnist("train")[1])
    it = data.make_pipeline(src, global_batch_size=2, seed=0, train=True, random_crop=True, random_flip=True,
                            process_index=0, process_count=1)
    batch = next(it)
    assert batch["image"].shape == (2, 8, 32, 32, 1) and batch["image"].dtype == np.float32


# ------------------------------------------------------------------------------------- tfds
def test_tfds_mock_data_source(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        src = data.make_source("tfds:mnist", "train", image_size=32, data_dir=str(tmp_path))
        assert len(src) == 8 and src.num_classes == 10
        it = data.make_pipeline(src, global_batch_size=4, seed=0, train=True, random_flip=True,
                                process_index=0, process_count=1)
        batch = next(it)
        cifar = data.make_source("tfds:cifar10", "test", image_size=16)
        assert cifar[0]["image"].shape == (16, 16, 3)
    assert batch["image"].shape == (4, 32, 32, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and ((batch["label"] >= 0) & (batch["label"] < 10)).all()
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_tfds_unprepared_and_unknown(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build mnist --file_format=array_record"):
        data.make_source("tfds:mnist", "train", image_size=32, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no dataset named 'no_such_dataset_xyz'"):
        data.make_source("tfds:no_such_dataset_xyz", "train", image_size=32, data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------- folder
def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def test_folder_source(tmp_path, caplog):
    root = tmp_path / "imgs"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    stripes = np.zeros((20, 40, 3), np.uint8)  # green | red | red | blue quarters
    stripes[:, :10] = (0, 255, 0)
    stripes[:, 10:30] = (255, 0, 0)
    stripes[:, 30:] = (0, 0, 255)
    _png(root / "cats" / "a.png", stripes)
    _png(root / "cats" / "b.png", np.full((24, 24), 200, np.uint8))  # grayscale -> RGB
    _png(root / "dogs" / "c.png", np.full((16, 16, 3), 50, np.uint8))
    _png(root / "dogs" / "d.png", np.full((30, 20, 3), 90, np.uint8))
    (root / "dogs" / "broken.png").write_bytes(b"this is not an image")
    (root / "dogs" / "notes.txt").write_text("ignored: not an image extension")
    with caplog.at_level(logging.WARNING):
        src = data.make_source(f"folder:{root}", "train", image_size=16)
    assert "Skipped 1 unreadable image file" in caplog.text and caplog.text.count("Skipped") == 1
    assert len(src) == 4 and src.num_skipped == 1 and src.class_names == ("cats", "dogs")
    labels = [int(src[i]["label"]) for i in range(4)]
    assert labels == [0, 0, 1, 1]
    first = src[0]["image"]
    assert first.shape == (16, 16, 3) and first.dtype == np.uint8
    # Center crop of the stripes keeps only the red middle half.
    assert (first[..., 0] > 240).all() and (first[..., 1:] < 15).all()
    np.testing.assert_array_equal(src[1]["image"], np.full((16, 16, 3), 200, np.uint8))
    it = data.make_pipeline(src, global_batch_size=2, seed=0, train=True, random_crop=True, random_flip=True,
                            process_index=0, process_count=1)
    batch = next(it)
    assert batch["image"].shape == (2, 16, 16, 3) and batch["label"].dtype == np.int32


def test_folder_truncated_image_is_replaced(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(buf, format="PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue()[:60])  # valid header, truncated data
    _png(tmp_path / "b.png", np.full((8, 8, 3), 99, np.uint8))
    src = data.make_source(f"folder:{tmp_path}", "test", image_size=8)
    assert len(src) == 2 and src.num_skipped == 0
    np.testing.assert_array_equal(src[0]["image"], np.full((8, 8, 3), 99, np.uint8))
    assert src.num_failed_reads == 1 and int(src[0]["label"]) == 0


def test_folder_split_subfolder_and_errors(tmp_path):
    (tmp_path / "test" / "x").mkdir(parents=True)
    (tmp_path / "train").mkdir()
    _png(tmp_path / "test" / "x" / "a.png", np.zeros((8, 8, 3), np.uint8))
    src = data.make_source(f"folder:{tmp_path}", "test", image_size=8)
    assert len(src) == 1 and src.class_names == ("x",)
    with pytest.raises(ValueError, match="contains no image files"):
        data.make_source(f"folder:{tmp_path}", "train", image_size=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.make_source(f"folder:{tmp_path / 'missing'}", "train", image_size=8)
    (tmp_path / "train" / "bad.jpg").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="no readable images"):
        data.make_source(f"folder:{tmp_path}", "train", image_size=8)
