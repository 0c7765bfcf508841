"""Evaluation sets: the paper's image subset, ImageFolder-identical decoding, the disk cache, and data errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from layercrit.data import load_data, load_fashion_mnist, subset_indices, to_model_input
from layercrit.errors import LayercritError
from layercrit.models import Preprocessing


def make_image_folder(root, n_per_class=5, classes=("cat", "dog", "eel"), size=(40, 30)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.mark.parametrize("seed", [0, 3])
def test_subset_is_the_first_images_of_the_papers_shuffled_loader(seed):
    dataset = TensorDataset(torch.arange(100))
    loader = DataLoader(dataset, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(seed))
    first_30 = torch.cat([batch[0] for _, batch in zip(range(3), loader, strict=False)]).tolist()
    assert subset_indices(100, 30, seed) == first_30


def test_image_folder_decodes_exactly_as_torchvision_imagefolder(tmp_path):
    from torchvision import datasets, transforms

    folder = make_image_folder(tmp_path / "val")
    pre = Preprocessing(resize=32, crop=24)
    evalset = load_data(str(folder), preprocessing=pre, images=None, seed=0, cache_dir=tmp_path / "cache")
    reference = datasets.ImageFolder(str(folder), transform=transforms.Compose(
        [transforms.Resize(32), transforms.CenterCrop(24), transforms.ToTensor()]))
    order = subset_indices(len(reference), None, 0)
    expected = torch.stack([reference[i][0] for i in order])
    assert torch.equal(to_model_input(evalset.images), expected)
    assert evalset.labels.tolist() == [reference[i][1] for i in order]
    assert list(evalset.classes) == ["cat", "dog", "eel"]


def test_decoded_images_are_cached_and_reused(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "val")
    pre = Preprocessing(resize=32, crop=24)
    first = load_data(str(folder), preprocessing=pre, images=8, cache_dir=tmp_path / "cache")
    from layercrit.data import folders

    monkeypatch.setattr(folders, "_decode_all", lambda *a, **k: pytest.fail("decoded again despite the cache"))
    second = load_data(str(folder), preprocessing=pre, images=8, cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, second.images) and first.data_id == second.data_id


def test_cache_is_rebuilt_when_the_images_change(tmp_path):
    folder = make_image_folder(tmp_path / "val", n_per_class=2)
    pre = Preprocessing(resize=32, crop=24)
    first = load_data(str(folder), preprocessing=pre, images=None, cache_dir=tmp_path / "cache")
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(folder / "cat" / "0.jpg")
    second = load_data(str(folder), preprocessing=pre, images=None, cache_dir=tmp_path / "cache")
    assert first.data_id != second.data_id
    assert not torch.equal(first.images, second.images)
    assert len(list((tmp_path / "cache" / "evalsets").iterdir())) == 2


def test_subset_is_seeded_and_smaller_than_the_folder(tmp_path):
    folder = make_image_folder(tmp_path / "val")
    a = load_data(str(folder), preprocessing=Preprocessing(resize=32, crop=24), images=6, seed=1, use_cache=False)
    b = load_data(str(folder), preprocessing=Preprocessing(resize=32, crop=24), images=6, seed=2, use_cache=False)
    assert len(a) == 6 and not torch.equal(a.images, b.images)


def test_corrupt_image_is_named_in_the_error(tmp_path):
    folder = make_image_folder(tmp_path / "val", n_per_class=2)
    (folder / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(LayercritError, match=r"corrupt image .*broken\.jpg.*--skip-bad-images"):
        load_data(str(folder), preprocessing=Preprocessing(resize=32, crop=24), images=None, use_cache=False)


def test_skip_bad_images_skips_and_counts_them(tmp_path):
    folder = make_image_folder(tmp_path / "val", n_per_class=2)
    (folder / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    evalset = load_data(str(folder), preprocessing=Preprocessing(resize=32, crop=24), images=None,
                        use_cache=False, skip_bad_images=True)
    assert len(evalset) == 6 and evalset.n_skipped == 1


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(LayercritError, match="data not found"):
        load_data(str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(LayercritError, match="no images in"):
        load_data(str(tmp_path / "empty"))


def test_fashion_mnist_test_set_loads_with_its_ten_classes():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == torch.uint8
    assert sorted(labels.unique().tolist()) == list(range(10))
    subset = load_data("fashion-mnist", images=500, seed=0)
    assert len(subset) == 500 and subset.classes[0] == "T-shirt/top"
    assert torch.equal(subset.images[0], images[subset_indices(10_000, 500, 0)[0]])


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path):
    with pytest.raises(LayercritError, match="apt-get install dataset-fashion-mnist"):
        load_data("fashion-mnist", root=str(tmp_path))
