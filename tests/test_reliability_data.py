"""Issue #11, data side: the same images for the same data_id every time, and every bad input a one-line error."""

import gzip
import re

import numpy as np
import pytest
import torch

from layercrit.data import load_data, load_fashion_mnist
from layercrit.errors import LayercritError


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
