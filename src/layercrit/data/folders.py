"""Image folders in ImageNet-val layout, decoded exactly as torchvision's ``ImageFolder`` with Resize → CenterCrop
→ ToTensor would, and kept on disk as a uint8 cache keyed by everything the decoded images depend on and checked
against a checksum whenever it is read: a damaged entry is decoded again, a cache that cannot be written is
skipped (both with a warning)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import LayercritError
from ..models.base import Preprocessing
from .evalset import EvalSet, eval_transform, subset_indices

log = logging.getLogger(__name__)


def image_folder(
    folder: Path, pre: Preprocessing, n: int | None, seed: int, *,
    cache_dir: str | Path | None, use_cache: bool, skip_bad_images: bool,
) -> EvalSet:
    classes, samples = _find_samples(folder)
    chosen = [samples[i] for i in subset_indices(len(samples), n, seed)]
    transform = eval_transform(pre)
    key = _fingerprint(folder, chosen, pre, seed, skip_bad_images)
    data_id = f"{folder.name}-n{len(chosen)}-s{seed}-{key[:10]}"
    description = f"{folder}: {len(chosen)} images (seed {seed})"

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
                   classes=classes, n_skipped=skipped, decode=None if skipped else decode,
                   transform=f"decoded with {pre.transform()} to uint8, fed in [0, 1]")


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
    """Everything the decoded images depend on: the options, and each chosen file's name, label and bytes.

    The bytes, not their size and mtime: a scripted copy or an extracted archive can give another folder (or this
    one, rewritten) the same names, sizes and mtimes with other pixels, and a key of those would hand it the
    first folder's images. Hashing the files reads them once, which costs a fraction of decoding them (reading
    the cache entry and checking its checksum reads about as many bytes again); a byte-for-byte copy elsewhere
    has the same key and rightly shares the entry. The folder's own path is left out for that reason.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([pre.resize, pre.crop, pre.interpolation, seed, skip_bad_images, "v3"]).encode())
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # hashlib releases the GIL on large inputs
        contents = pool.map(_file_digest, [path for path, _ in chosen])
        for (path, label), content in zip(chosen, contents, strict=True):
            digest.update(f"{os.path.relpath(path, folder)}|{label}|{content}\n".encode())
    return digest.hexdigest()


def _file_digest(path: str) -> str:
    """The SHA-256 of a file's bytes; an unreadable file gets a digest of its error, which decoding then reports
    (or skips, with --skip-bad-images) as it reports any unreadable image."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as error:
        return f"unreadable: {error.__class__.__name__} {error.errno}"


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
