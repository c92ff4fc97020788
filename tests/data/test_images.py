"""Image data: prepare from a folder per class with bad files counted by reason, .npz arrays, CIFAR-10's
binary format, the built-in digits, and the image loader's resumable, rank-independent batches; the token
loader's lanes for recurrent models."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from gptforge.data.image_loader import ImageAugment, ImageLoader
from gptforge.data.images import builtin_digits, load_images, prepare_images, read_cifar10
from gptforge.data.loader import Layout, TokenLoader
from gptforge.errors import DataError


def png(path, size=(12, 10), mode="RGB", colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode != "L" else 128).save(path)


def test_prepare_a_folder_counts_every_bad_image_by_reason(tmp_path):
    src = tmp_path / "src"
    for i in range(6):
        png(src / "cat" / f"{i}.png")
        png(src / "dog" / f"{i}.jpg", mode="L")
    (src / "cat" / "empty.png").write_bytes(b"")
    (src / "cat" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="PNG")
    (src / "dog" / "truncated.png").write_bytes(good.getvalue()[:-40])
    Image.new("CMYK", (8, 8)).save(src / "dog" / "cmyk.jpg")
    (src / "dog" / "notes.txt").write_text("not an image")

    manifest = prepare_images(src, tmp_path / "out", size=8, val_fraction=0.3)

    assert manifest["skipped"] == {"empty": 1, "unreadable": 1, "truncated": 1, "mode CMYK": 1, "not an image file": 1}
    assert manifest["classes"] == ["cat", "dog"]
    assert sum(map(sum, manifest["counts"].values())) == 12
    data = load_images(tmp_path / "out")
    assert data.train_images.shape[1:] == (8, 8, 3) and data.train_images.dtype == np.uint8
    cat = data.train_images[data.train_labels == 0]
    assert (cat[..., 0] > 150).all() and (cat[..., 1] < 50).all()  # red stays red through the resize
    (tmp_path / "out" / "val_labels.npy").write_bytes((tmp_path / "out" / "train_labels.npy").read_bytes())
    with pytest.raises(DataError, match="sha256 differs"):
        load_images(tmp_path / "out")


def test_nothing_usable_is_a_clear_error(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"no usable image for training \(skipped: 1 empty\)"):
        prepare_images(tmp_path / "src", tmp_path / "out")
    with pytest.raises(DataError, match="one subfolder of images per class"):
        prepare_images(tmp_path / "src" / "a", tmp_path / "out2")


def test_prepare_npz_keeps_its_val_arrays(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (20, 6, 6), dtype=np.uint8), labels=np.arange(20) % 4,
             val_images=rng.integers(0, 256, (5, 6, 6), dtype=np.uint8), val_labels=np.arange(5) % 4)
    prepare_images(tmp_path / "d.npz", tmp_path / "out", size=6, channels=1)
    data = load_images(tmp_path / "out")
    assert data.train_images.shape == (20, 6, 6, 1) and data.val_images.shape == (5, 6, 6, 1)
    assert data.model_fields() == {"num_classes": 4, "image_size": 6, "image_channels": 1}
    np.savez(tmp_path / "bad.npz", pixels=np.zeros(3))
    with pytest.raises(DataError, match="expected arrays named images"):
        prepare_images(tmp_path / "bad.npz", tmp_path / "out3")


def test_cifar10_binary_records_are_read_plane_by_plane(tmp_path):
    def record(label, r, g, b):
        planes = [np.full(1024, v, dtype=np.uint8) for v in (r, g, b)]
        planes[0][33] = 7  # row 1, column 1 of the red plane
        return np.concatenate([[label], *planes]).astype(np.uint8)

    for i in range(1, 6):
        np.concatenate([record(i, 10 * i, 1, 2), record(9, 0, 255, 0)]).tofile(tmp_path / f"data_batch_{i}.bin")
    record(3, 5, 6, 7).tofile(tmp_path / "test_batch.bin")
    data = read_cifar10(tmp_path)
    assert data.train_images.shape == (10, 32, 32, 3) and data.classes[3] == "cat"
    assert data.train_labels.tolist() == [1, 9, 2, 9, 3, 9, 4, 9, 5, 9]
    assert data.train_images[0, 0, 0].tolist() == [10, 1, 2] and data.train_images[0, 1, 1, 0] == 7
    assert data.val_images[0, 5, 5].tolist() == [5, 6, 7]
    assert load_images(tmp_path).train_images.shape == (10, 32, 32, 3)  # data.dir may name the folder itself
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="not a whole number of 3073-byte records"):
        read_cifar10(tmp_path)


def test_builtin_digits_split_is_fixed_and_stratified():
    a, b = builtin_digits(), builtin_digits()
    assert len(a.train_images) + len(a.val_images) == 1797 and a.train_images.shape[1:] == (8, 8, 1)
    assert np.array_equal(a.val_labels, b.val_labels) and np.array_equal(a.val_images, b.val_images)
    assert 34 <= np.bincount(a.val_labels).min() and np.bincount(a.val_labels).max() <= 38
    assert a.train_images.max() == 255


def batches_of(loader, steps):
    return [[(x.clone(), y.clone()) for x, y in loader.next_step()] for _ in range(steps)]


def test_image_loader_resumes_exactly_and_is_the_same_stream_on_two_ranks():
    data = builtin_digits()
    aug = ImageAugment(crop=2, flip=True, cutout=3)
    one = ImageLoader(data, Layout(1, 8, 2), seed=3, augment=aug)
    first = batches_of(one, 3)
    saved = json.loads(json.dumps(one.state_dict()))  # through JSON, as state.json holds it
    later = batches_of(one, 200)  # crosses an epoch (1437 images, 16 a step)
    again = ImageLoader(data, Layout(1, 8, 2), seed=3, augment=aug, state=saved)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for s, t in zip(later, batches_of(again, 200)) for a, b in zip(s, t))
    assert one.epoch == 2
    ranks = [ImageLoader(data, Layout(1, 8, 1, rank=r, world_size=2), seed=3, augment=aug) for r in range(2)]
    for step in first:
        for r, loader in enumerate(ranks):
            (x, y), = loader.next_step()
            assert torch.equal(x, step[r][0]) and torch.equal(y, step[r][1])
    plain = ImageLoader(data, Layout(1, 8, 2), seed=3)
    assert not torch.equal(plain.next_step()[0][0], first[0][0][0])  # augmentation did change the images


def test_token_lanes_continue_each_row_from_the_step_before(small_data):
    from gptforge.data.datadir import load_data_dir

    shards = load_data_dir(small_data).train
    loader = TokenLoader(shards, Layout(16, 2, 2), mode="sequential", prefetch=0, streams=True)
    steps = [loader.next_step() for _ in range(3)]
    rows = [torch.cat([x for x, _ in step]) for step in steps]  # (4, 16) each: the 4 global rows
    targets = [torch.cat([y for _, y in step]) for step in steps]
    for k in range(2):
        assert torch.equal(rows[k + 1][:, 0], targets[k][:, -1])  # row j goes on where it stopped
    assert not torch.equal(rows[0][1, :], rows[0][0, :])
