"""Issue #11, data side: the same images for the same data_id every time, and every bad input a one-line error."""

import errno
import gzip
import os
import re
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from layercrit.data import folders, load_data, load_fashion_mnist
from layercrit.errors import LayercritError
from layercrit.models import Preprocessing

from .test_data import make_image_folder


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- Fashion-MNIST files


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_mnist(root, n_images=6, n_labels=None, image_bytes=None, label_bytes=None):
    """A small test split in ``root``; ``*_bytes`` replace a file's gzipped content with exactly those bytes."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n_labels or n_images, dtype=np.uint8)
    image_file, label_file = root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz"
    image_file.write_bytes(gzip.compress(idx_bytes(images)) if image_bytes is None else image_bytes)
    label_file.write_bytes(gzip.compress(idx_bytes(labels)) if label_bytes is None else label_bytes)
    return images, labels


def test_fashion_mnist_written_here_loads_from_data_root(tmp_path):
    images, labels = write_fashion_mnist(tmp_path)
    loaded_images, loaded_labels = load_fashion_mnist("test", str(tmp_path))
    assert torch.equal(loaded_images[:, 0], torch.from_numpy(images))
    assert loaded_labels.tolist() == labels.tolist()


def good_images_gz(n_images=6):
    images = np.random.default_rng(0).integers(0, 256, (n_images, 28, 28), dtype=np.uint8)
    return gzip.compress(idx_bytes(images))


CORRUPT_IMAGE_FILES = {
    "truncated gzip": (good_images_gz()[:200], r"cannot be read \(EOFError"),
    "not gzip at all": (b"<html>404 Not Found</html>", r"cannot be read \(BadGzipFile"),
    "float IDX type": (gzip.compress(bytes([0, 0, 0x0D, 3]) + bytes(12)), "not an unsigned-byte IDX file"),
    "header cut short": (gzip.compress(bytes([0, 0, 8, 3, 0, 0])), "ends inside its IDX header"),
    "fewer bytes than the header says": (gzip.compress(idx_bytes(np.zeros((6, 28, 28)))[:-100]),
                                         r"holds 4604 bytes of data where its IDX header \[6, 28, 28\] says 4704"),
    "not 28×28 images": (gzip.compress(idx_bytes(np.zeros((6, 28, 27)))), r"shape \(6, 28, 27\), not N×28×28"),
}


@pytest.mark.parametrize("content, problem", CORRUPT_IMAGE_FILES.values(), ids=CORRUPT_IMAGE_FILES.keys())
def test_corrupt_fashion_mnist_images_file_is_a_one_line_error_with_the_fix(tmp_path, content, problem):
    write_fashion_mnist(tmp_path, image_bytes=content)
    with pytest.raises(LayercritError) as excinfo:
        load_data("fashion-mnist", root=str(tmp_path))
    message = one_line_error(excinfo)
    assert message.startswith(str(tmp_path / "t10k-images-idx3-ubyte.gz"))
    assert re.search(problem, message)
    assert "apt-get install --reinstall dataset-fashion-mnist" in message and "--data-root" in message


@pytest.mark.parametrize("n_labels, label_bytes", [
    (5, None),  # one image without a label
    (7, None),  # one label without an image
    (None, gzip.compress(idx_bytes(np.array([0, 1, 2, 3, 4, 10])))),  # a class that does not exist
], ids=["fewer labels", "more labels", "label out of range"])
def test_labels_that_do_not_match_the_images_are_a_one_line_error(tmp_path, n_labels, label_bytes):
    write_fashion_mnist(tmp_path, n_labels=n_labels, label_bytes=label_bytes)
    with pytest.raises(LayercritError) as excinfo:
        load_data("fashion-mnist", root=str(tmp_path))
    message = one_line_error(excinfo)
    assert message.startswith(str(tmp_path / "t10k-labels-idx1-ubyte.gz"))
    assert "one label in 0..9 for each of the 6 images" in message and "dataset-fashion-mnist" in message


# ---------------------------------------------------------------- image folders: links and empty classes


def folder_evalset(folder, **options):
    options = {"use_cache": "cache_dir" in options, **options}
    return load_data(str(folder), preprocessing=Preprocessing(resize=16, crop=12), images=None, **options)


def same_evalset(a, b):
    return (a.data_id == b.data_id and a.n_skipped == b.n_skipped and torch.equal(a.images, b.images)
            and torch.equal(a.labels, b.labels))


def test_symlink_loop_in_a_class_folder_counts_each_image_once(tmp_path):
    folder = make_image_folder(tmp_path / "val", n_per_class=3, size=(16, 16))
    without_loop = folder_evalset(folder)
    (folder / "cat" / "loop").symlink_to("..")
    (folder / "dog" / "self").symlink_to(".")
    with_loops = folder_evalset(folder)
    assert len(with_loops) == 9 and sorted(with_loops.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert same_evalset(with_loops, without_loop)


def test_link_to_another_class_folder_does_not_relabel_its_images(tmp_path):
    folder = make_image_folder(tmp_path / "val", n_per_class=2, size=(16, 16))
    reference = folder_evalset(folder)
    (folder / "cat" / "dogs").symlink_to(folder / "dog")
    (folder / "eel" / "outside").symlink_to(tmp_path)  # the folder holding the data folder
    assert same_evalset(folder_evalset(folder), reference)


def test_linked_folders_are_followed_once_each(tmp_path):
    elsewhere = make_image_folder(tmp_path / "disk2", n_per_class=2, classes=("cat", "extra"), size=(16, 16))
    folder = make_image_folder(tmp_path / "val", n_per_class=2, classes=("dog",), size=(16, 16))
    (folder / "cat").symlink_to(elsewhere / "cat")  # ImageNet copies often link class folders from elsewhere
    (folder / "dog" / "more").symlink_to(elsewhere / "extra")
    (folder / "dog" / "more-again").symlink_to(elsewhere / "extra")
    evalset = folder_evalset(folder)
    assert list(evalset.classes) == ["cat", "dog"]
    assert sorted(evalset.labels.tolist()) == [0, 0, 1, 1, 1, 1]


def test_empty_class_folders_keep_their_label_indices_and_are_named_in_a_warning(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "val", n_per_class=2, classes=("a", "c", "e"), size=(16, 16))
    for name in ("b", "d", "f", "g", "h", "i", "j"):
        (folder / name).mkdir()
    (folder / "b" / "notes.txt").write_text("not an image")
    evalset = folder_evalset(folder)
    assert list(evalset.classes) == ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    assert sorted(evalset.labels.tolist()) == [0, 0, 2, 2, 4, 4]
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"7 of the 10 class folders in {folder} hold no images (b, d, f, g, h, ...)" in warning


def test_folder_whose_class_folders_are_all_empty_is_refused(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "val" / name).mkdir(parents=True)
    with pytest.raises(LayercritError) as excinfo:
        folder_evalset(tmp_path / "val")
    assert one_line_error(excinfo).startswith(f"no images in {tmp_path / 'val'}: expected one sub-folder per class")


# ---------------------------------------------------------------- images that must not be decoded


def write_png_header(path, width, height):
    """A PNG that declares ``width``×``height`` grey pixels: PIL refuses it on open, before decoding anything."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_one_line_corrupt_image_error(tmp_path):
    folder = make_image_folder(tmp_path / "val", n_per_class=2, size=(16, 16))
    write_png_header(folder / "dog" / "bomb.png", 20_000, 10_000)  # 2e8 pixels, over twice PIL's limit
    with pytest.raises(LayercritError) as excinfo:
        folder_evalset(folder)
    message = one_line_error(excinfo)
    assert message.startswith(f"corrupt image {folder / 'dog' / 'bomb.png'} (DecompressionBombError)")
    assert message.endswith("--skip-bad-images")


def test_skip_bad_images_skips_a_decompression_bomb(tmp_path):
    folder = make_image_folder(tmp_path / "val", n_per_class=2, size=(16, 16))
    write_png_header(folder / "dog" / "bomb.png", 20_000, 10_000)
    evalset = folder_evalset(folder, skip_bad_images=True)
    assert len(evalset) == 6 and evalset.n_skipped == 1


# ---------------------------------------------------------------- the decoded-image cache


def test_cache_made_with_skip_bad_images_is_not_used_without_it(tmp_path):
    folder = make_image_folder(tmp_path / "val", n_per_class=2, size=(16, 16))
    (folder / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    assert folder_evalset(folder, skip_bad_images=True, cache_dir=tmp_path / "cache").n_skipped == 1
    with pytest.raises(LayercritError, match=r"corrupt image .*broken\.jpg"):
        folder_evalset(folder, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("failing, error", [
    ("numpy.save", OSError(errno.ENOSPC, "No space left on device")),
    ("numpy.save", OSError(errno.EDQUOT, "Disk quota exceeded")),
    ("tempfile.mkdtemp", OSError(errno.EROFS, "Read-only file system")),
    ("os.mkdir", PermissionError(errno.EACCES, "Permission denied")),
], ids=["disk full", "over quota", "read-only", "permission denied"])
def test_unwritable_cache_is_warned_about_once_and_the_run_goes_on(tmp_path, monkeypatch, caplog, failing, error):
    folder = make_image_folder(tmp_path / "val", n_per_class=2, size=(16, 16))
    reference = folder_evalset(folder)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(folders, "_unwritable_caches", set())
    monkeypatch.setattr(failing, fail)
    cache = tmp_path / "cache"
    runs = [folder_evalset(folder, cache_dir=cache) for _ in range(2)]
    assert all(same_evalset(run, reference) for run in runs)
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"cannot write the image cache in {cache / 'evalsets'} ({error.strerror}): going on")
    assert not [path for path in cache.rglob("*") if path.is_file() or path.name.startswith(".tmp-")]


def bmp_folder(root, seed, classes=("cat", "dog"), n_per_class=3):
    """Uncompressed images: other pixels give files of exactly the same size."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.bmp")
    return root


def repaint_keeping_names_sizes_and_mtimes(folder, seed):
    """Other pixels in every image, each file with the size and mtime it had (a script's copy, an extracted archive)."""
    stats = {path: path.stat() for path in folder.rglob("*.bmp")}
    bmp_folder(folder, seed)
    for path, stat in stats.items():
        assert path.stat().st_size == stat.st_size
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_two_folders_with_equal_names_sizes_and_mtimes_do_not_share_a_cache(tmp_path):
    first = bmp_folder(tmp_path / "a" / "val", seed=0)
    second = tmp_path / "b" / "val"
    shutil.copytree(first, second, copy_function=shutil.copy2)
    repaint_keeping_names_sizes_and_mtimes(second, seed=1)
    cache = tmp_path / "cache"
    measured_first = folder_evalset(first, cache_dir=cache)
    measured_second = folder_evalset(second, cache_dir=cache)
    assert same_evalset(measured_second, folder_evalset(second))  # what --no-cache gives
    assert not torch.equal(measured_first.images, measured_second.images)
    assert measured_first.data_id != measured_second.data_id


def test_images_rewritten_in_place_with_their_mtimes_restored_are_decoded_again(tmp_path):
    folder = bmp_folder(tmp_path / "val", seed=0)
    cache = tmp_path / "cache"
    before = folder_evalset(folder, cache_dir=cache)
    repaint_keeping_names_sizes_and_mtimes(folder, seed=1)
    after = folder_evalset(folder, cache_dir=cache)
    assert same_evalset(after, folder_evalset(folder))
    assert not torch.equal(before.images, after.images)


def test_a_byte_for_byte_copy_of_a_folder_reuses_its_cache(tmp_path, monkeypatch):
    first = bmp_folder(tmp_path / "a" / "val", seed=0)
    cache = tmp_path / "cache"
    measured_first = folder_evalset(first, cache_dir=cache)
    second = tmp_path / "b" / "val"
    shutil.copytree(first, second, copy_function=shutil.copy)  # new mtimes, same bytes: the same images
    monkeypatch.setattr(folders, "_decode_all", lambda *a, **k: pytest.fail("decoded again despite the cache"))
    assert same_evalset(folder_evalset(second, cache_dir=cache), measured_first)
