"""The non-finite guard: a non-finite loss or gradient never reaches the weights, is recorded on the device without a
host sync, and stops the run when the record is read."""

import pytest
import torch

from mcl.guards import FiniteGuard
from mcl.hostsync import HostSyncCounter


def step(guard: FiniteGuard, weights: torch.Tensor, loss: torch.Tensor, index: int) -> None:
    optimizer = torch.optim.SGD([weights], lr=0.1)
    optimizer.zero_grad()
    loss.backward()
    guard.see_loss(loss)
    guard.mask_gradients([weights.grad], index)
    optimizer.step()


def test_a_finite_step_is_untouched_and_leaves_no_record():
    guard, weights = FiniteGuard(check_every=10), torch.ones(3, requires_grad=True)
    step(guard, weights, (weights * torch.tensor([1.0, 2.0, 3.0])).sum(), 0)
    assert torch.allclose(weights.detach(), torch.tensor([0.9, 0.8, 0.7]))
    assert guard.first_bad_step() is None


def test_non_finite_loss_and_gradients_never_reach_the_weights_and_the_first_is_recorded():
    guard, weights = FiniteGuard(check_every=10), torch.ones(3, requires_grad=True)
    with HostSyncCounter() as counter:
        step(guard, weights, (weights * float("nan")).sum(), 4)  # non-finite loss (and gradients)
        step(guard, weights, weights.sum(), 5)
        step(guard, weights, (weights.pow(0.5) * torch.tensor([float("inf"), 1.0, 1.0])).sum(), 6)
    assert counter.record.total == 0  # recorded on the device, nothing read on the host
    assert torch.equal(weights.detach(), torch.ones(3) - 0.1)  # only the finite step 5 moved them
    assert guard.first_bad_step() == (4, "training loss")


def test_non_finite_gradients_of_a_finite_loss_are_named_as_gradients():
    guard, weights = FiniteGuard(), torch.zeros(2, requires_grad=True)
    step(guard, weights, weights.sqrt().sum() * 0, 7)  # d sqrt(x)/dx at 0 is inf; 0 * inf = nan, loss 0
    assert guard.first_bad_step() == (7, "gradients")
    assert torch.equal(weights.detach(), torch.zeros(2))


@pytest.mark.parametrize("value", [0, -3, 1.5, True])
def test_the_check_interval_must_be_a_positive_step_count(value):
    with pytest.raises(ValueError, match="finite_check_every"):
        FiniteGuard(value)


def test_due_every_check_every_steps():
    guard = FiniteGuard(check_every=3)
    assert [step for step in range(1, 10) if guard.due(step)] == [3, 6, 9]


def test_under_loss_scaling_only_a_non_finite_loss_is_recorded_and_the_gradients_are_the_scalers():
    guard, weights = FiniteGuard(), torch.ones(2, requires_grad=True)
    weights.grad = torch.tensor([0.5, float("inf")])  # scaled gradients: the scaler will skip this step
    guard.see_loss(torch.tensor(float("nan")))
    guard.mask_gradients([weights.grad], 3, loss_only=True)
    assert torch.equal(weights.grad, torch.tensor([0.5, float("inf")]))  # left to the scaler
    assert guard.first_bad_step() == (3, "training loss")
    guard = FiniteGuard()
    guard.see_loss(torch.tensor(1.0))
    guard.mask_gradients([torch.tensor([float("inf")])], 4, loss_only=True)  # an overflow the scaler handles
    assert guard.first_bad_step() is None


def test_the_record_is_read_once_per_step_with_accumulated_batches():
    guard = FiniteGuard(check_every=2)
    assert [guard.due(step) for step in (1, 2, 2, 2, 3, 4, 4)] == [False, True, False, False, False, True, False]
