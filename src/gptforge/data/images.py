"""Labelled images for the convolutional models: prepared folders, the built-in digits, CIFAR-10's binary files.

`gptforge prepare --images SRC --out DATA` reads SRC, a folder with one subfolder per class (PNG, JPEG, BMP,
GIF, WebP, TIFF, PPM: whatever Pillow opens) or an .npz file of arrays, resizes every image to
--image-size pixels square, and writes DATA:

    train_images.npy  (N, S, S, C) uint8      val_images.npy   the held-out images, alike
    train_labels.npy  (N,) int16              val_labels.npy
    manifest.json     format gptforge-images: classes, per-class counts, the sha256 of every file, and the
                      files skipped, by reason

Images that are empty, unreadable, truncated, too large or of a mode that is not an image's colours (CMYK,
32-bit integer, float) are skipped and counted by reason; nothing usable is an error. A folder is split into
train and val by a hash of each file's path (so adding images never moves the others); an .npz keeps its
own val arrays when it has them. The .npy files are read with allow_pickle=False, after their sha256.

With no data given, a cnn trains on the built-in digits: scikit-learn's 1,797 handwritten 8x8 digits, which
ship with scikit-learn (no download), split 80/20 per class by a fixed seed. A folder of CIFAR-10's binary
batches (data_batch_1.bin ... test_batch.bin) is read as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptforge.errors import DataError
from gptforge.fileio import atomic_write_text, sha256_file

FORMAT, FORMAT_VERSION = "gptforge-images", 1
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
COLOUR_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA"})  # converted to L or RGB; others skipped
MAX_PIXELS = 64_000_000  # one image's cost is bounded: larger ones are skipped as too large
CIFAR_RECORD = 1 + 3 * 32 * 32  # a label byte, then the red, green and blue planes, 32 x 32 each
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class ImageData:
    """Images and labels per split, in memory or memory-mapped: images (N, S, S, C) uint8, labels (N,)."""

    path: Path | str
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    classes: list[str]
    manifest: dict | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    tokenizer = None  # what a token data dir has; an image folder has no tokenizer, vocabulary or shards
    vocab_size = 0
    train: tuple = ()
    val: tuple = ()

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[3])

    def model_fields(self) -> dict[str, int]:
        """The model section's fields the data decides (as a token data dir decides the vocabulary)."""
        return {"num_classes": len(self.classes), "image_size": self.image_size, "image_channels": self.channels}

    def label_entropy(self) -> float:
        """Entropy of the training labels (nats): the loss of a model that learned the class frequencies only."""
        p = np.bincount(np.asarray(self.train_labels), minlength=len(self.classes)) / len(self.train_labels)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())


def is_image_dir(path: str | Path) -> bool:
    """Whether a folder holds images: a gptforge-images manifest, or CIFAR-10's binary batches."""
    path = Path(path)
    if (path / "data_batch_1.bin").is_file():
        return True
    try:
        return json.loads((path / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_images(path: str | Path, *, verify_sha256: bool = True) -> ImageData:
    """A prepared image folder (checked against its manifest) or a folder of CIFAR-10 binary batches."""
    path = Path(path)
    if (path / "data_batch_1.bin").is_file():
        return read_cifar10(path)
    manifest_file = path / "manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{manifest_file}: cannot read the manifest ({e}); create the folder with "
                        "gptforge prepare --images") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{manifest_file}: not a gptforge image manifest (format {FORMAT}, version {FORMAT_VERSION})")
    arrays = {}
    try:
        for name, entry in manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise DataError(f"{file}: listed in manifest.json but missing")
            if verify_sha256 and sha256_file(file) != entry["sha256"]:
                raise DataError(f"{file}: sha256 differs from manifest.json; the file was changed or damaged")
            arrays[name] = _read_npy(file)
        data = ImageData(path, arrays["train_images.npy"], arrays["train_labels.npy"], arrays["val_images.npy"],
                         arrays["val_labels.npy"], list(manifest["classes"]), manifest, manifest.get("skipped", {}))
    except (KeyError, TypeError) as e:
        raise DataError(f"{manifest_file}: malformed, missing or wrong entry {e}") from None
    check_arrays(data, str(path))
    return data


def _read_npy(file: Path) -> np.ndarray:
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{file}: not a readable .npy array ({e})") from None


def check_arrays(data: ImageData, where: str) -> None:
    """Shapes, dtypes and label ranges agree; each split holds at least one image."""
    for split in ("train", "val"):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1] != images.shape[2] or \
                images.shape[3] not in (1, 3):
            raise DataError(f"{where}: {split} images have shape {images.shape} and dtype {images.dtype}; "
                            "expected (N, S, S, 1 or 3) uint8")
        if labels.shape != (len(images),) or len(images) == 0:
            raise DataError(f"{where}: {split} holds {len(images)} images and labels of shape {labels.shape}; "
                            "expected at least one image and one label per image")
        if labels.min() < 0 or labels.max() >= len(data.classes):
            raise DataError(f"{where}: {split} labels run {labels.min()}..{labels.max()}, outside the "
                            f"{len(data.classes)} classes")
    if data.val_images.shape[1:] != data.train_images.shape[1:]:
        raise DataError(f"{where}: val images are {data.val_images.shape[1:]}, train {data.train_images.shape[1:]}")


def class_names(checkpoint: str | Path, num_classes: int) -> list[str]:
    """The class names a run was trained on (classes.json in its checkpoint), else the class indices."""
    file = Path(checkpoint) / "classes.json"
    try:
        names = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        names = None
    if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return names
    return [str(i) for i in range(num_classes)]


def builtin_digits(seed: int = 0) -> ImageData:
    """scikit-learn's handwritten digits (1,797 images, 8x8, 17 grey levels), on disk with scikit-learn; 20%
    of each class held out by a fixed permutation, so every run sees the same split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the built-in digits come with scikit-learn: pip install 'gptforge[images]' "
                        "(or give data.dir a folder made by gptforge prepare --images)") from None
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        val[members[: round(0.2 * len(members))]] = True
    return ImageData("builtin:digits", images[~val], labels[~val], images[val], labels[val],
                     [str(c) for c in range(10)])


def read_cifar10(folder: str | Path) -> ImageData:
    """CIFAR-10 in its standard binary format: data_batch_1..5.bin (train) and test_batch.bin (val), records
    of a label byte and 3 x 1024 bytes (red, green, blue planes of a 32 x 32 image, rows in order)."""
    folder = Path(folder)

    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        for name in names:
            file = folder / name
            if not file.is_file():
                raise DataError(f"{file}: missing; a CIFAR-10 binary folder holds data_batch_1.bin ... "
                                "data_batch_5.bin and test_batch.bin")
            raw = np.fromfile(file, dtype=np.uint8)
            if raw.size == 0 or raw.size % CIFAR_RECORD:
                raise DataError(f"{file}: {raw.size} bytes is not a whole number of {CIFAR_RECORD}-byte records")
            parts.append(raw.reshape(-1, CIFAR_RECORD))
        records = np.concatenate(parts)
        labels = records[:, 0].astype(np.int64)
        if labels.max() >= 10:
            raise DataError(f"{folder}: label {labels.max()} in a CIFAR-10 file (expected 0..9)")
        images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
        return np.ascontiguousarray(images), labels

    train = sorted(p.name for p in folder.glob("data_batch_*.bin"))
    train_images, train_labels = read(train)
    val_images, val_labels = read(["test_batch.bin"])
    meta = folder / "batches.meta.txt"
    names = meta.read_text().split() if meta.is_file() else []
    classes = names if len(names) == 10 else list(CIFAR_CLASSES)
    return ImageData(folder, train_images, train_labels, val_images, val_labels, classes)


# ----------------------------------------------------------------------------------------------------------
# gptforge prepare --images


def _pil():
    try:
        import PIL.Image
    except ImportError:
        raise DataError("reading image files needs Pillow: pip install 'gptforge[images]'") from None
    return PIL.Image


def _open_image(file: Path, size: int, channels: int):
    """The image resized to (size, size, channels) uint8, or the reason it is skipped."""
    Image = _pil()
    UnidentifiedImageError = Image.UnidentifiedImageError

    if not file.is_file():
        return "not a regular file"
    if file.stat().st_size == 0:
        return "empty"
    try:
        with Image.open(file) as img:
            if img.width * img.height > MAX_PIXELS:
                return "too large"
            if img.mode not in COLOUR_MODES:
                return f"mode {img.mode}"
            img.load()  # decodes now: a truncated file fails here
            img = img.convert("RGB" if channels == 3 else "L").resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8).reshape(size, size, channels)
    except UnidentifiedImageError:
        return "unreadable"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return "truncated" if "truncated" in str(e) else "unreadable"


def _from_folder(src: Path, size: int, channels: int, val_fraction: float):
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{src}: no class folders; expected one subfolder of images per class")
    skipped: Counter = Counter()
    splits = {"train": ([], []), "val": ([], [])}
    for label, name in enumerate(classes):
        for file in sorted((src / name).rglob("*")):
            if file.is_dir():
                continue
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                skipped["not an image file"] += 1
                continue
            image = _open_image(file, size, channels)
            if isinstance(image, str):
                skipped[image] += 1
                continue
            rel = file.relative_to(src).as_posix().encode()
            split = "val" if int(hashlib.sha256(rel).hexdigest()[:8], 16) / 2**32 < val_fraction else "train"
            splits[split][0].append(image)
            splits[split][1].append(label)
    return classes, splits, skipped


def _from_npz(src: Path, size: int, channels: int, val_fraction: float):
    try:
        with np.load(src, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{src}: not a readable .npz of arrays ({e})") from None
    if "images" not in arrays or "labels" not in arrays:
        raise DataError(f"{src}: holds {', '.join(arrays) or 'nothing'}; expected arrays named images "
                        "(N, H, W) or (N, H, W, C) uint8 and labels (N,), optionally val_images and val_labels")
    Image = _pil()

    def convert(images: np.ndarray) -> list[np.ndarray]:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(f"{src}: images of shape {images.shape} and dtype {images.dtype}; expected uint8 "
                            "(N, H, W) or (N, H, W, C)")
        out = []
        for img in images:
            pil = Image.fromarray(img.squeeze(-1) if img.ndim == 3 and img.shape[-1] == 1 else img)
            pil = pil.convert("RGB" if channels == 3 else "L").resize((size, size), Image.BILINEAR)
            out.append(np.asarray(pil, dtype=np.uint8).reshape(size, size, channels))
        return out

    labels = arrays["labels"].astype(np.int64).ravel()
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else \
        [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
    images = convert(arrays["images"])
    if "val_images" in arrays:
        splits = {"train": (images, list(labels)),
                  "val": (convert(arrays["val_images"]), list(arrays["val_labels"].astype(np.int64).ravel()))}
    else:
        held = np.random.default_rng(0).random(len(images)) < val_fraction
        splits = {"train": ([x for x, h in zip(images, held) if not h], list(labels[~held])),
                  "val": ([x for x, h in zip(images, held) if h], list(labels[held]))}
    return classes, splits, Counter()


def prepare_images(src: str | Path, out: str | Path, *, size: int = 32, channels: int = 3,
                   val_fraction: float = 0.1, force: bool = False) -> dict:
    """Write the image folder described above from `src`; returns its manifest."""
    src, out = Path(src), Path(out)
    if size < 1 or channels not in (1, 3) or not 0 < val_fraction < 1:
        raise DataError(f"--image-size {size}, --channels {channels}, --val-fraction {val_fraction}: expected a "
                        "size >= 1, 1 or 3 channels and a fraction in (0, 1)")
    if out.exists() and any(out.iterdir()) and not force:
        raise DataError(f"--out {out}: already exists and is not empty; pass --force to replace it")
    if src.is_dir():
        classes, splits, skipped = _from_folder(src, size, channels, val_fraction)
    elif src.suffix == ".npz" and src.is_file():
        classes, splits, skipped = _from_npz(src, size, channels, val_fraction)
    else:
        raise DataError(f"{src}: expected a folder with one subfolder of images per class, or an .npz file")
    counted = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none"
    if not splits["train"][0]:
        raise DataError(f"{src}: no usable image for training (skipped: {counted})")
    if not splits["val"][0]:  # a tiny set: hold out the last training image rather than have no val split
        splits["val"] = ([splits["train"][0].pop()], [splits["train"][1].pop()])
    out.mkdir(parents=True, exist_ok=True)
    files, counts = {}, {}
    for split, (images, labels) in splits.items():
        for name, array in ((f"{split}_images.npy", np.stack(images)),
                            (f"{split}_labels.npy", np.asarray(labels, dtype=np.int16))):
            tmp = out / f".{name}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(tmp, out / name)
            files[name] = {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
        counts[split] = np.bincount(np.asarray(labels), minlength=len(classes)).tolist()
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": str(src), "image_size": size,
                "channels": channels, "classes": classes, "counts": counts, "skipped": dict(skipped), "files": files}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))  # last: the folder is complete
    return manifest


def run_prepare_images(args: argparse.Namespace) -> int:
    manifest = prepare_images(args.images, args.out, size=args.image_size, channels=args.channels,
                              val_fraction=args.val_fraction or 0.1, force=args.force)
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(manifest["skipped"].items())) or "none"
    n = {split: sum(c) for split, c in manifest["counts"].items()}
    print(f"{args.out}: {n['train']:,} train and {n['val']:,} val images of {len(manifest['classes'])} classes, "
          f"{manifest['image_size']}x{manifest['image_size']}x{manifest['channels']}; skipped: {skipped}")
    return 0
