"""Data specs → a fixed evaluation set, decoded once and kept as a uint8 tensor (cached on disk).

Specs:
    DIR             an image folder in ImageNet-val layout (one sub-folder per class, classes sorted), read
                    exactly as torchvision's ``ImageFolder`` with Resize → CenterCrop → ToTensor would
    fashion-mnist   the Fashion-MNIST test set from its IDX ``.gz`` files (Debian's dataset-fashion-mnist)
    fashion-mnist-train  its training set (module criticality is defined on the training set)

The subset of N images is the one the paper's code evaluates: the first N images of a ``DataLoader(shuffle=True)``
seeded with ``seed`` (see :func:`subset_indices`).

The disk cache is keyed by everything the decoded images depend on and checked against a checksum whenever it
is read: a damaged entry is decoded again, a cache that cannot be written is skipped (both with a warning).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import LayercritError
from .models import Preprocessing

log = logging.getLogger(__name__)

FASHION_MNIST_ROOTS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@dataclass
class EvalSet:
    """A fixed set of evaluation images (uint8 N×C×H×W, or float in [0, 1]) and their integer labels."""

    images: torch.Tensor
    labels: torch.Tensor
    data_id: str
    description: str
    classes: Sequence[str] | None = None
    n_skipped: int = 0
    decode: Callable[[Sequence[int]], torch.Tensor] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, *, redecode: bool = False) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Yield ``(positions, images, labels)``; ``redecode`` reads the images from their source again (naive path)."""
        for start in range(0, len(self), batch_size):
            part = slice(start, min(start + batch_size, len(self)))
            if redecode and self.decode is not None:
                images = self.decode(range(part.start, part.stop))
            else:
                images = self.images[part]
            yield part, images, self.labels[part]

    @classmethod
    def from_tensors(cls, images: torch.Tensor, labels: torch.Tensor, description: str = "tensors", *,
                     check_range: bool = True) -> EvalSet:
        """``check_range=False`` takes float images in any range (already normalised, for a model that gets them as
        they are)."""
        if images.ndim != 4 or len(images) != len(labels):
            raise LayercritError(f"images must be N×C×H×W with one label each, got {tuple(images.shape)} and {len(labels)} labels")
        if check_range and images.is_floating_point() and (images.min() < 0 or images.max() > 1):
            raise LayercritError("float images must be in [0, 1] (the model wrapper normalises them)")
        digest = hashlib.sha256(images.contiguous().numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:16]
        return cls(images=images, labels=labels.long(), data_id=f"tensors-{digest}", description=description)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float in [0, 1], exactly as ``torchvision.transforms.ToTensor`` computes it."""
    return images.float().div(255) if images.dtype == torch.uint8 else images.float()


def subset_indices(n_total: int, n: int | None, seed: int) -> list[int]:
    """The first ``n`` indices a ``DataLoader(dataset, shuffle=True, generator=Generator().manual_seed(seed))`` yields.

    The loader's iterator draws one int64 from the generator (its worker base seed) before the sampler's
    ``randperm``; we replay both so the subset is the paper's, image for image.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    order = torch.randperm(n_total, generator=generator).tolist()
    return order if n is None or n >= n_total else order[:n]


def load_data(
    spec: str | EvalSet | torch.utils.data.Dataset | torch.utils.data.DataLoader,
    *,
    preprocessing: Preprocessing | None = None,
    images: int | None = 10_000,
    seed: int = 0,
    root: str | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    skip_bad_images: bool = False,
) -> EvalSet:
    """Resolve a data spec (or a torch ``Dataset``/``DataLoader``, see :mod:`layercrit.datasets`) into an
    :class:`EvalSet` of ``images`` images (all when fewer)."""
    if isinstance(spec, EvalSet):
        return spec
    if not isinstance(spec, str | Path):
        from .datasets import from_torch, is_torch_data

        if not is_torch_data(spec):
            raise LayercritError(f"data must be a spec, an EvalSet, (images, labels) tensors, a torch Dataset or a "
                                 f"DataLoader, not {type(spec).__name__}")
        return from_torch(spec, preprocessing=preprocessing, images=images, seed=seed)
    if spec in ("fashion-mnist", "fmnist"):
        return _fashion_mnist(root, images, seed)
    if spec in ("fashion-mnist-train", "fmnist-train"):
        return _fashion_mnist(root, images, seed, split="train")
    path = Path(spec)
    if not path.exists():
        raise LayercritError(f"data not found: {spec} (give an image folder in ImageNet-val layout, or 'fashion-mnist')")
    if not path.is_dir():
        raise LayercritError(f"data {spec} is not a folder: give a folder with one sub-folder of images per class")
    return _image_folder(path, preprocessing or Preprocessing(), images, seed,
                         cache_dir=cache_dir, use_cache=use_cache, skip_bad_images=skip_bad_images)


# ---------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of MNIST and Fashion-MNIST.

    A damaged file (truncated or corrupt gzip, wrong header, less or more data than the header says) raises
    :class:`LayercritError` naming the file and what is wrong with it.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as error:  # not gzip, truncated, bad CRC or deflate data
        raise LayercritError(f"{path} cannot be read ({error.__class__.__name__}: {error})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise LayercritError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise LayercritError(f"{path} ends inside its IDX header")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) - offset != math.prod(dims):
        raise LayercritError(f"{path} holds {len(data) - offset} bytes of data where its IDX header {dims} says "
                             f"{math.prod(dims)}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def fashion_mnist_files(split: str = "test", root: str | None = None) -> tuple[Path, Path]:
    """Paths of the images and labels IDX files of a Fashion-MNIST split ('train' or 'test')."""
    prefix = "t10k" if split == "test" else "train"
    roots = [root] if root else [os.environ.get("FASHION_MNIST_ROOT"), *FASHION_MNIST_ROOTS]
    for candidate in filter(None, roots):
        images = Path(candidate) / f"{prefix}-images-idx3-ubyte.gz"
        labels = Path(candidate) / f"{prefix}-labels-idx1-ubyte.gz"
        if images.is_file() and labels.is_file():
            return images, labels
    where = root or FASHION_MNIST_ROOTS[0]
    raise LayercritError(
        f"Fashion-MNIST not found in {where}: install it with 'apt-get install dataset-fashion-mnist' "
        "or pass --data-root DIR holding the IDX .gz files"
    )


def load_fashion_mnist(split: str = "test", root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as (uint8 N×1×28×28, int64 labels)."""
    image_file, label_file = fashion_mnist_files(split, root)
    fix = ("reinstall it with 'apt-get install --reinstall dataset-fashion-mnist' "
           "or pass --data-root DIR holding good copies of the IDX .gz files")
    try:
        images, labels = read_idx(image_file), read_idx(label_file)
    except LayercritError as error:
        raise LayercritError(f"{error}: {fix}") from None
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise LayercritError(f"{image_file} holds images of shape {images.shape}, not N×28×28: {fix}")
    if labels.ndim != 1 or len(labels) != len(images) or labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise LayercritError(f"{label_file} does not hold one label in 0..9 for each of the {len(images)} images "
                             f"of {image_file.name}: {fix}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _fashion_mnist(root: str | None, n: int | None, seed: int, split: str = "test") -> EvalSet:
    images, labels = load_fashion_mnist(split, root)
    chosen = torch.tensor(subset_indices(len(labels), n, seed))
    return EvalSet(
        images=images[chosen],
        labels=labels[chosen],
        data_id=f"fashion-mnist-{split}-n{len(chosen)}-s{seed}",
        description=f"Fashion-MNIST {split} set, {len(chosen)} images (seed {seed})",
        classes=FASHION_MNIST_CLASSES,
    )


# ---------------------------------------------------------------- image folders


def _image_folder(
    folder: Path, pre: Preprocessing, n: int | None, seed: int, *,
    cache_dir: str | Path | None, use_cache: bool, skip_bad_images: bool,
) -> EvalSet:
    classes, samples = _find_samples(folder)
    chosen = [samples[i] for i in subset_indices(len(samples), n, seed)]
    transform = _eval_transform(pre)
    key = _fingerprint(folder, chosen, pre, seed, skip_bad_images)
    data_id = f"{folder.name}-n{len(chosen)}-s{seed}-{key[:10]}"
    description = f"{folder}: {len(chosen)} images (seed {seed}), {pre.describe()}"

    def decode(positions: Sequence[int]) -> torch.Tensor:
        return torch.stack([_decode_one(chosen[i][0], transform) for i in positions])

    cache = _cache_path(cache_dir, key) if use_cache else None
    cached = _read_cache(cache) if cache is not None else None
    if cached is not None:
        images, labels, skipped = cached
    else:
        images, labels, skipped = _decode_all(chosen, transform, skip_bad_images)
        if cache is not None:
            _write_cache(cache, images, labels, skipped, description)
    return EvalSet(images=images, labels=labels, data_id=data_id, description=description,
                   classes=classes, n_skipped=skipped, decode=None if skipped else decode)


def _find_samples(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The class names (sorted folder names) and the ``(path, class index)`` samples, in ``ImageFolder``'s order.

    A class folder without images keeps its index, so labels stay aligned with the model's outputs (a subset of
    ImageNet val); it is warned about. Only a folder with no images at all is refused.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

    try:
        classes, _ = find_classes(str(folder))
    except FileNotFoundError:
        classes = []
    root = os.path.realpath(folder)
    class_dirs = {os.path.realpath(folder / name) for name in classes}
    samples, empty = [], []
    for index, name in enumerate(classes):
        paths = _class_images(str(folder / name), root, class_dirs, IMG_EXTENSIONS)
        samples.extend((path, index) for path in paths)
        if not paths:
            empty.append(name)
    if not samples:
        raise LayercritError(f"no images in {folder}: expected one sub-folder per class holding image files "
                             f"({', '.join(IMG_EXTENSIONS)})")
    if empty:
        log.warning("%d of the %d class folders in %s hold no images (%s%s): their labels are kept, no image has them",
                    len(empty), len(classes), folder, ", ".join(empty[:5]), ", ..." if len(empty) > 5 else "")
    return classes, samples


def _class_images(class_dir: str, root: str, class_dirs: set[str], extensions: tuple[str, ...]) -> list[str]:
    """The image files under one class folder, sorted as torchvision's ``make_dataset`` sorts them.

    torchvision walks with ``os.walk(followlinks=True)``, so a link loop such as ``cat/loop -> ..`` repeats the
    whole data folder under ``cat`` until the OS refuses (9 files became 369 samples, most of them mislabelled).
    Here a directory, linked or not, is walked only when it leads somewhere new: not one this class already
    walked, not another class folder (its images have their own label) and not the data folder or a folder
    above it. Links are still followed once, because ImageNet copies are often class folders linked from
    elsewhere. Real directories are taken before links at each level, so the paths stay the same when a link
    is added.
    """

    def encloses_root(real: str) -> bool:
        return os.path.commonpath([real, root]) == real

    if encloses_root(os.path.realpath(class_dir)):
        return []
    walked = {os.path.realpath(class_dir)}
    found = []
    for here, dirnames, filenames in os.walk(class_dir, followlinks=True):
        kept = []
        for name in sorted(dirnames, key=lambda name: (os.path.islink(os.path.join(here, name)), name)):
            real = os.path.realpath(os.path.join(here, name))
            if real not in walked and real not in class_dirs and not encloses_root(real):
                walked.add(real)
                kept.append(name)
        dirnames[:] = sorted(kept)
        found.append((here, sorted(name for name in filenames if name.lower().endswith(extensions))))
    return [os.path.join(here, name) for here, names in sorted(found) for name in names]


def _eval_transform(pre: Preprocessing):
    from torchvision import transforms

    steps = []
    mode = transforms.InterpolationMode(pre.interpolation)
    if pre.resize is not None:
        steps.append(transforms.Resize(pre.resize, interpolation=mode))
    if pre.crop is not None:
        steps.append(transforms.CenterCrop(pre.crop))
    steps.append(transforms.PILToTensor())
    return transforms.Compose(steps)


def _decode_one(path: str, transform) -> torch.Tensor:
    from PIL import Image

    with open(path, "rb") as f:
        image = Image.open(f)
        return transform(image.convert("RGB"))


def _decode_all(samples, transform, skip_bad_images: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    from PIL import Image, UnidentifiedImageError

    def attempt(sample):
        try:
            return _decode_one(sample[0], transform)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
            if not skip_bad_images:
                raise LayercritError(
                    f"corrupt image {sample[0]} ({error.__class__.__name__}): remove it or pass --skip-bad-images"
                ) from None
            return None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = list(pool.map(attempt, samples))
    keep = [i for i, image in enumerate(decoded) if image is not None]
    if not keep:
        raise LayercritError("every selected image failed to decode")
    sizes = {tuple(decoded[i].shape) for i in keep}
    if len(sizes) > 1:
        raise LayercritError(f"images decode to different sizes {sorted(sizes)[:3]}: set a crop size (--crop)")
    images = torch.stack([decoded[i] for i in keep])
    labels = torch.tensor([samples[i][1] for i in keep], dtype=torch.int64)
    return images, labels, len(samples) - len(keep)


def _fingerprint(folder: Path, chosen, pre: Preprocessing, seed: int, skip_bad_images: bool) -> str:
    """Everything the decoded images depend on: a cache entry made under other options is never reused."""
    digest = hashlib.sha256()
    digest.update(json.dumps([pre.resize, pre.crop, pre.interpolation, seed, skip_bad_images, "v2"]).encode())
    for path, label in chosen:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, folder)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("LAYERCRIT_CACHE", Path.home() / ".cache" / "layercrit"))


def _cache_path(cache_dir: str | Path | None, key: str) -> Path:
    return Path(cache_dir or default_cache_dir()) / "evalsets" / key[:32]


def _checksum(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256(f"{images.dtype.str}{images.shape}{labels.dtype.str}{labels.shape}".encode())
    digest.update(np.ascontiguousarray(images))
    digest.update(np.ascontiguousarray(labels))
    return digest.hexdigest()


def _read_cache(entry: Path) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """The cached images, labels and skip count; None when there is no entry or it cannot be used.

    The arrays are checked against the checksum written with them, which reads the images once: a changed
    byte under an intact header would otherwise give other numbers under the same data_id. A damaged or
    unreadable entry is warned about and decoded again (and rewritten).
    """
    try:
        if not entry.exists():
            return None
        meta = json.loads((entry / "meta.json").read_text())
        if not isinstance(meta, dict) or "checksum" not in meta:
            raise ValueError("meta.json holds no checksum")
        images = np.load(entry / "images.npy", mmap_mode="c")
        labels = np.load(entry / "labels.npy")
        if meta["checksum"] != _checksum(images, labels):
            raise ValueError("the images or labels do not match their checksum")
        return torch.from_numpy(images), torch.from_numpy(labels), int(meta["n_skipped"])
    except (OSError, EOFError, ValueError, KeyError, TypeError) as error:
        if isinstance(error, OSError) and error.filename:
            problem = f"{Path(error.filename).name}: {error.strerror}"
        else:
            problem = f"{error.__class__.__name__}: {error}"
        log.warning("cannot use the cached images in %s (%s): decoding them again", entry, problem)
        return None


_unwritable_caches: set[Path] = set()  # said once per cache folder, not once per model of a sweep


def _write_cache(target: Path, images: torch.Tensor, labels: torch.Tensor, skipped: int, description: str) -> None:
    """Write next to the target, then rename: a killed run never leaves a half-written cache entry.

    An entry already there is damaged (or :func:`_read_cache` would have used it) and is replaced. The cache
    only saves time: a disk that is full, over quota, read-only or not ours is warned about and the run goes
    on without it.
    """
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        np.save(staging / "images.npy", images.numpy())
        np.save(staging / "labels.npy", labels.numpy())
        meta = {"n_skipped": skipped, "description": description,
                "checksum": _checksum(images.numpy(), labels.numpy())}
        (staging / "meta.json").write_text(json.dumps(meta))
        _discard(target)
        try:
            os.replace(staging, target)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another run wrote the same entry meanwhile: keep theirs
    except OSError as error:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if target.parent not in _unwritable_caches:
            _unwritable_caches.add(target.parent)
            log.warning("cannot write the image cache in %s (%s): going on without it; pass --cache-dir DIR "
                        "for another place, or --no-cache", target.parent, error.strerror or error)


def _discard(entry: Path) -> None:
    """Move an entry aside before deleting it, so that no reader ever sees it half deleted."""
    aside = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
    try:
        os.replace(entry, aside)
    except FileNotFoundError:
        pass
    finally:
        shutil.rmtree(aside, ignore_errors=True)
