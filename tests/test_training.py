"""Training methods: augmentations, the shared loop, PGD, SimCLR, linear probes (tiny ResNet-8s on random images)."""

import pytest
import torch

from layercrit import training
from layercrit.errors import LayercritError
from layercrit.models import Normalized
from layercrit.models.architectures import FMNIST_MEAN, FMNIST_STD, SmallResNet


@pytest.fixture(autouse=True)
def one_thread():
    """Small-batch training runs ~9x slower with 2 threads on a busy 2-core machine than with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_net(seed: int = 0) -> Normalized:
    torch.manual_seed(seed)
    return Normalized(SmallResNet(depth=8), FMNIST_MEAN, FMNIST_STD, in_chans=1)


def tiny_data(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)


def images01(n: int = 8, seed: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def backbone_state(net: Normalized) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.model.state_dict().items() if not k.startswith("fc.")}


# ---------------------------------------------------------------- augmentations


@pytest.mark.parametrize("name", sorted(training.AUGMENTATIONS))
def test_augmentation_keeps_shape_and_range_and_is_reproducible_from_the_seed(name):
    x = images01()
    augment = training.AUGMENTATIONS[name]
    first = augment(x, torch.Generator().manual_seed(0))
    again = augment(x, torch.Generator().manual_seed(0))
    other = augment(x, torch.Generator().manual_seed(1))
    assert first.shape == x.shape
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, x)


def test_crop_shifts_each_image_by_whole_pixels_with_black_borders():
    x = images01(16)
    out = training.crop(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for image, result in zip(padded, out, strict=True):
        windows = [image[:, top:top + 28, left:left + 28] for top in range(9) for left in range(9)]
        assert any(torch.allclose(result, w, atol=1e-5) for w in windows)


def test_flip_mirrors_about_half_the_images_and_leaves_the_rest():
    x = images01(200)
    out = training.flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 70 < sum(flipped) < 130


def test_augmenter_applies_names_in_order_and_rejects_unknown_names():
    x = images01()
    chained = training.augmenter(["flip", "noise"])(x, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(chained, training.noise(training.flip(x, g), g))
    with pytest.raises(LayercritError, match="unknown augmentation 'blur': one of crop, resized_crop"):
        training.augmenter(["flip", "blur"])


# ---------------------------------------------------------------- the loop


def test_fit_lowers_the_loss_and_is_reproducible_from_the_seed():
    images, labels = tiny_data(32)
    runs = []
    for _ in range(2):
        net = tiny_net()
        losses = training.train_supervised(net, images, labels, epochs=4, batch_size=16, lr=0.05, schedule="constant")
        runs.append((losses, net.model.state_dict()))
    (losses, state), (losses_again, state_again) = runs
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert losses == losses_again
    assert all(torch.equal(state[k], state_again[k]) for k in state)


@pytest.mark.slow  # training: CI runs it
def test_bf16_mixed_precision_runs_the_batches_in_bfloat16_keeps_float32_weights_and_is_reproducible():
    images, labels = tiny_data(32)
    seen, runs = [], []
    for _ in range(2):
        net = tiny_net()
        hook = net.model.fc.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        losses = training.train_supervised(net, images, labels, epochs=4, batch_size=16, lr=0.05, schedule="constant",
                                           precision="bf16")
        hook.remove()
        runs.append((losses, net.model.state_dict()))
    (losses, state), (losses_again, state_again) = runs
    assert set(seen) == {torch.bfloat16}
    assert losses[-1] < losses[0] and losses == losses_again
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    assert all(v.is_contiguous() for v in state.values()), "the trained weights are handed back contiguous"


def test_unknown_precision_is_an_error():
    images, labels = tiny_data(4)
    with pytest.raises(LayercritError, match="unknown training precision 'fp16': one of fp32, bf16"):
        training.train_supervised(tiny_net(), images, labels, epochs=1, precision="fp16")


def test_fractional_epochs_stop_after_that_share_of_the_steps():
    images, labels = tiny_data(40)
    calls = []

    def loss_fn(batch, y, g):
        calls.append(len(y))
        return (net.model.fc.weight ** 2).sum()

    net = tiny_net()
    training.fit(net, images, labels, loss_fn, epochs=1.5, batch_size=10)
    assert calls == [10] * 6


@pytest.mark.parametrize(("schedule", "factors"), [
    ("constant", [1, 1, 1, 1]),
    ("step", [1, 1, 0.1, 0.01]),
    ("cosine", [1, 0.5 * (1 + 2 ** -0.5), 0.5, 0.5 * (1 - 2 ** -0.5)]),
])
def test_learning_rate_schedule_per_step(schedule, factors):
    images, labels = tiny_data(8)
    net = tiny_net()
    optimizer_lr = []

    def loss_fn(batch, y, g):
        return net.model.fc.bias.sum()

    original_step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        optimizer_lr.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.SGD, "step", spy)
        training.fit(net, images, labels, loss_fn, epochs=1, batch_size=2, lr=0.2, schedule=schedule)
    assert optimizer_lr == pytest.approx([0.2 * f for f in factors])


def test_unknown_schedule_is_an_error():
    images, labels = tiny_data(4)
    with pytest.raises(LayercritError, match="unknown learning-rate schedule 'linear': one of constant, step, cosine"):
        training.train_supervised(tiny_net(), images, labels, epochs=1, schedule="linear")


# ---------------------------------------------------------------- adversarial training


@pytest.mark.parametrize(("norm", "eps"), [("linf", 8 / 255), ("l2", 1.0)])
def test_pgd_examples_stay_in_the_budget_and_the_image_range_and_raise_the_loss(norm, eps):
    net = tiny_net().eval()
    x, y = images01(16), torch.arange(16) % 10
    attack = training._Pgd(norm=norm, eps=eps, steps=5)
    adversarial = attack(net, x, y, torch.Generator().manual_seed(0))
    delta = (adversarial - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all() and (size > eps / 4).all()
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(net(adversarial), y) > loss(net(x), y)


def test_adversarial_training_with_a_zero_budget_learns_the_same_weights_as_supervised_training():
    images, labels = tiny_data(16)
    supervised, adversarial = tiny_net(), tiny_net()
    training.train_supervised(supervised, images, labels, epochs=1, batch_size=8)
    training.train_adversarial(adversarial, images, labels, epochs=1, batch_size=8, norm="linf", eps=0.0, steps=2)
    learned = [k for k, _ in supervised.model.named_parameters()]
    assert all(torch.equal(supervised.model.state_dict()[k], adversarial.model.state_dict()[k]) for k in learned)
    assert not torch.equal(supervised.model.state_dict()["bn1.running_mean"], tiny_net().model.state_dict()["bn1.running_mean"])


def test_unknown_pgd_norm_is_an_error():
    images, labels = tiny_data(4)
    with pytest.raises(LayercritError, match="unknown PGD norm 'l1': linf or l2"):
        training.train_adversarial(tiny_net(), images, labels, epochs=1, norm="l1", eps=0.1)


# ---------------------------------------------------------------- self-supervised and frozen backbones


def test_simclr_pretraining_never_sees_the_labels_and_the_probe_only_trains_fc():
    images, labels = tiny_data(32)
    results = []
    for y in (labels, labels.roll(1)):
        net = tiny_net()
        training.train_simclr(net, images, y, epochs=1, batch_size=16, lr=0.1, probe={"epochs": 2})
        results.append(net)
    with_labels, shuffled = results
    assert all(torch.equal(a, b) for a, b in zip(backbone_state(with_labels).values(),
                                                  backbone_state(shuffled).values(), strict=True))
    assert not torch.equal(with_labels.model.fc.weight, shuffled.model.fc.weight)
    assert not torch.equal(backbone_state(tiny_net())["conv1.weight"], backbone_state(with_labels)["conv1.weight"])


def test_frozen_random_keeps_the_random_weights_and_sets_batchnorm_statistics_to_the_data():
    images, labels = tiny_data(64)
    net = tiny_net()
    init = backbone_state(net)
    training.train_frozen_random(net, images, labels, probe={"epochs": 3})
    after = backbone_state(net)
    weights = [k for k in init if k.endswith(("weight", "bias"))]
    assert weights and all(torch.equal(init[k], after[k]) for k in weights)
    first_conv = net.model.conv1((training.to_model_input(images) - net.mean) / net.std)
    assert torch.allclose(after["bn1.running_mean"], first_conv.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(after["bn1.running_var"], first_conv.var((0, 2, 3)), rtol=1e-3)


def test_linear_probe_folds_the_feature_standardisation_into_fc():
    images, labels = (torch.cat([t] * 4) for t in tiny_data(16))  # repeated: the probe can fit them
    net = tiny_net()
    training.calibrate_batchnorm(net, images)
    losses = training.train_linear_probe(net, images, labels, epochs=40, batch_size=64, lr=0.5)
    assert losses[-1] < losses[0]
    # fc now works on the raw features: the network classifies its training images as the probe learned them.
    assert training.accuracy(net, images, labels) > 50


@pytest.mark.slow  # training: CI runs it
def test_robust_accuracy_is_at_most_clean_accuracy_and_equals_it_at_a_zero_budget():
    from layercrit.training import accuracy, robust_accuracy

    net = tiny_net()
    images, labels = tiny_data(64)
    clean = accuracy(net, images, labels)
    assert robust_accuracy(net, images, labels, norm="linf", eps=0.0) == pytest.approx(clean)
    assert robust_accuracy(net, images, labels, norm="linf", eps=0.3) <= clean
    assert robust_accuracy(net, images, labels, norm="l2", eps=3.0) <= clean
