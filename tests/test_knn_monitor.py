import pytest
import torch

from mcl.knn import knn_top1
from mcl.knn_monitor import KNNMonitor

from .conftest import small_mcl


def run_validation(monitor, model, batches):
    """What Lightning does for ``(images, labels, dataloader_idx)`` batches: the model's ``validation_step`` output to
    the monitor, between the epoch hooks."""
    monitor.on_validation_epoch_start(None, model)
    for batch_idx, (images, labels, loader) in enumerate(batches):
        features = model.validation_step((images, labels), batch_idx, dataloader_idx=loader)
        monitor.on_validation_batch_end(None, model, features, (images, labels), batch_idx, loader)
    monitor.on_validation_epoch_end(None, model)


def test_the_monitor_logs_the_knn_top1_of_the_models_pooled_features_and_resets(monkeypatch):
    """Bank batches (loader 0) and validation batches (loader 1) feed the metric; the epoch end logs its top-1 and
    starts over. A validation without the second loader logs nothing."""
    model = small_mcl(knn_k=5).eval()
    monitor = model.knn_monitor
    assert monitor in model.configure_callbacks() and monitor.metric.k == 5
    logged = {}
    monkeypatch.setattr(model, "log", lambda name, value, **kwargs: logged.update({name: value}))
    generator = torch.Generator().manual_seed(0)
    bank, bank_labels = torch.randn(12, 3, 64, 64, generator=generator), torch.arange(12) % 3
    val, val_labels = torch.randn(6, 3, 64, 64, generator=generator), torch.arange(6) % 3
    with torch.no_grad():
        run_validation(
            monitor, model, [(bank[:8], bank_labels[:8], 0), (bank[8:], bank_labels[8:], 0), (val, val_labels, 1)]
        )
        expected = knn_top1(model.pooled_features(val), val_labels, model.pooled_features(bank), bank_labels, k=5)
    assert list(logged) == ["val/knn_top1"]
    assert logged["val/knn_top1"].item() == pytest.approx(expected, abs=1e-4)
    assert not monitor.metric.has_bank_and_queries
    logged.clear()
    with torch.no_grad():
        run_validation(monitor, model, [(bank, bank_labels, 0)])
    assert logged == {} and not monitor.metric.has_bank_and_queries


def test_the_bank_loader_is_configurable():
    monitor = KNNMonitor(k=1, bank_loader=1)
    features = torch.eye(3)
    labels = torch.arange(3)
    monitor.on_validation_batch_end(None, None, features, (None, labels), 0, dataloader_idx=1)
    monitor.on_validation_batch_end(None, None, features, (None, labels), 0, dataloader_idx=0)
    assert monitor.metric.compute().item() == 100.0


def test_the_bank_is_kept_for_the_feature_map_only_when_asked(monkeypatch):
    """With ``keep_bank`` the epoch's end keeps the bank's normalised features and labels (the pictures' feature
    map reads them); without it nothing is kept, and the next validation forgets what was."""
    model = small_mcl(knn_k=5).eval()
    monitor = model.knn_monitor
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
    generator = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(6, 3, 64, 64, generator=generator), torch.arange(6) % 2
    batches = [(bank, labels, 0), (bank[:2], labels[:2], 1)]
    with torch.no_grad():
        run_validation(monitor, model, batches)
        assert monitor.kept_bank is None
        monitor.keep_bank = True
        run_validation(monitor, model, batches)
        features, kept_labels = monitor.kept_bank
        expected = torch.nn.functional.normalize(model.pooled_features(bank), dim=1)
    assert torch.allclose(features, expected, atol=1e-6) and torch.equal(kept_labels, labels)
    monitor.on_validation_epoch_start(None, model)
    assert monitor.kept_bank is None
