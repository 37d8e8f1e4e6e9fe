"""Supervised multi-level pretraining: labels follow their cells, the loss is the weighted cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

from mcl.cells import level_cells
from mcl.loss import MultiLevelCrossEntropy, MultiLevelInfoNCE
from mcl.methods.supervised import assemble_labels
from mcl.montage import assemble_levels, assemble_montage

from .conftest import small_supervised


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_every_cell_carries_the_label_its_pixels_encode(level):
    """Image b is filled with the value of its label; after assembly each cell's pixels equal its cell label."""
    labels = torch.tensor([3, 7, 1, 1, 9, 0, 4, 2, 8, 5, 6, 3, 2, 2, 7, 9])
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 3, 64, 64)
    montages, sources = assemble_montage(images, level, 2, generator=torch.Generator().manual_seed(level))
    cell_labels = assemble_labels(labels, sources)
    grid, cell = 2**level, 64 // 2**level
    for m in range(2):
        for row in range(grid):
            for col in range(grid):
                patch = montages[m, :, row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
                assert torch.all(patch == cell_labels[m, row, col])


def test_loss_equals_the_weighted_cross_entropy_reference():
    """Eval mode makes cell features independent of the batch, so each cell can be classified on its own."""
    model = small_supervised(levels=3).eval()
    views = torch.randn(16, 3, 3, 64, 64)
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        total, logs = model.forward_losses(views, labels)
        model.seed_montages()  # replay the same montages
        montages = model.build_montages(views)
        expected = 0.0
        for level, weight in enumerate([0.5, 0.25, 0.125]):
            images, sources = montages[level]
            pyramid = model.neck(dict(enumerate(model.backbone(images)[1:])))[2 - level]
            grid, cells = 2**level, []
            for m in range(len(images)):
                for row in range(grid):
                    for col in range(grid):
                        tile = pyramid[m : m + 1, :, row * 2 : row * 2 + 2, col * 2 : col * 2 + 2]
                        cells.append(model.classifier(model.head(tile)))
            level_loss = F.cross_entropy(torch.cat(cells), labels[sources.flatten()])
            assert logs[f"loss_level{level}"].item() == pytest.approx(level_loss.item(), rel=1e-5)
            expected += weight * level_loss.item()
    assert total.item() == pytest.approx(expected, rel=1e-5)


def short_run_losses(model, views, labels, steps=10):
    """Losses of ``steps`` SGD steps on one fixed batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss, _ = model.forward_losses(views, labels)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def test_a_short_run_lowers_the_loss():
    losses = short_run_losses(small_supervised(levels=2), torch.randn(16, 2, 3, 64, 64), torch.arange(16) % 4)
    assert losses[-1] < 0.5 * losses[0]


def test_labels_outside_the_classifier_are_rejected():
    model = small_supervised(levels=1)
    with pytest.raises(ValueError, match="label 10 is out of range .* num_classes=10"):
        model.forward_losses(torch.randn(4, 1, 3, 64, 64), torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="label -1 is out of range"):
        model.forward_losses(torch.randn(4, 1, 3, 64, 64), torch.tensor([0, 1, -1, 2]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"levels": 5}, "levels=5"),
        ({"image_size": 100}, "image_size=100"),
        ({"num_classes": 1}, "num_classes=1"),
        ({"loss": MultiLevelCrossEntropy(2)}, "loss.levels=2 but levels=3"),
        (
            {"loss": MultiLevelInfoNCE(3)},
            "SupervisedMultiLevel needs a MultiLevelCrossEntropy loss .loss=cross_entropy.",
        ),
    ],
)
def test_bad_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_supervised(**kwargs)


def test_the_loss_module_sets_level_weights_and_label_smoothing():
    loss = MultiLevelCrossEntropy(1, level_weights=[0.8], label_smoothing=0.1)
    model = small_supervised(levels=1, classifier_input="pooled_c5", loss=loss).eval()
    views, labels = torch.randn(8, 1, 3, 64, 64), torch.arange(8) % 10
    with torch.no_grad():
        total, _ = model.forward_losses(views, labels)
        logits = model.classifier(model.backbone.forward_pooled(views[:, 0]))
        expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert total.item() == pytest.approx(0.8 * expected.item(), rel=1e-5)
    assert model.hparams["loss"]["label_smoothing"] == 0.1 and model.hparams["loss"]["level_weights"] == [0.8]


def test_plain_supervised_classifies_pooled_c5_of_one_view():
    """classifier_input=pooled_c5: logits are the linear classifier of the backbone's pooled C5, nothing else."""
    model = small_supervised(levels=1, classifier_input="pooled_c5").eval()
    assert model.neck is None and model.head is None
    assert not any(name.startswith(("neck.", "head.")) for name in model.state_dict())
    views = torch.randn(8, 1, 3, 64, 64)
    labels = torch.arange(8) % 10
    with torch.no_grad():
        total, logs = model.forward_losses(views, labels)
        expected = F.cross_entropy(model.classifier(model.backbone.forward_pooled(views[:, 0])), labels)
    assert total.item() == pytest.approx(0.5 * expected.item(), rel=1e-5)  # level weight of level 0: 1/2
    assert logs["loss_level0"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_plain_supervised_learns_and_needs_one_level():
    model = small_supervised(levels=1, classifier_input="pooled_c5")
    losses = short_run_losses(model, torch.randn(16, 1, 3, 64, 64), torch.arange(16) % 4)
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="classifier_input='pooled_c5' .* levels=3: set levels=1"):
        small_supervised(levels=3, classifier_input="pooled_c5")
    with pytest.raises(ValueError, match="classifier_input='c5' is invalid"):
        small_supervised(levels=1, classifier_input="c5")


def test_validation_logs_accuracy_on_plain_images_and_on_montages_of_the_run_seed(monkeypatch):
    """Validation batches (loader 1) log ``val/acc`` on the plain images and ``val/acc_level{s}`` on montages drawn
    from the run's seed; bank batches (loader 0) only feed the kNN monitor."""
    model = small_supervised(levels=2, seed=3).eval()
    logged = {}
    monkeypatch.setattr(model, "log", lambda name, value, **kwargs: logged.update({name: value.item()}))
    images, labels = torch.randn(8, 3, 64, 64), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    with torch.no_grad():
        model.validation_step((images, labels), 0, dataloader_idx=0)
        assert logged == {}
        model.validation_step((images, labels), 0, dataloader_idx=1)
        montages = assemble_levels(images, 2, generator=torch.Generator().manual_seed(3))
        plain = model.classifier(level_cells([images], model.backbone, model.neck, model.head)[0])
        level1 = model.level_logits(montages, labels)[1]
    expected = {
        "val/acc": (plain.argmax(1) == labels).float().mean().item() * 100,
        "val/acc_level1": (level1[0].argmax(1) == level1[1]).float().mean().item() * 100,
    }
    assert logged == pytest.approx({**expected, "val/acc_level0": expected["val/acc"]})
