"""SIGTERM and SIGINT: at once outside a Trainer call, at a step boundary inside one; Lightning's SLURM requeue
signal stays Lightning's."""

import os
import signal

import pytest
import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mcl.interrupts import Interruptions, RunInterrupted


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_outside_a_trainer_call_stops_at_once_with_128_plus_the_signal(signum, code):
    before = signal.getsignal(signum)
    with pytest.raises(RunInterrupted) as stopped, Interruptions() as interruptions:
        os.kill(os.getpid(), signum)
    assert stopped.value.code == code and interruptions.received == signum
    assert signal.getsignal(signum) is before  # the handlers are restored


def test_inside_a_trainer_call_sigint_becomes_lightnings_sigterm_and_a_second_stops_at_once():
    passed_on = []
    previous = signal.signal(signal.SIGTERM, lambda *args: passed_on.append("SIGTERM"))
    try:
        with Interruptions() as interruptions, interruptions.trainer_call():
            lightning = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, lambda *args: (passed_on.append("SIGTERM"), lightning(*args)))
            os.kill(os.getpid(), signal.SIGINT)  # no exception: the loop stops at the step's end
            assert passed_on == ["SIGTERM"] and interruptions.received == signal.SIGINT
            with pytest.raises(RunInterrupted) as second:
                os.kill(os.getpid(), signal.SIGINT)
            assert second.value.code == 130
            assert interruptions.exit_for(SIGTERMException()).code == 130  # the first signal decides the status
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_lightnings_slurm_requeue_handler_is_installed_beside_ours(monkeypatch):
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "pretrain", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, plugins=[SLURMEnvironment(auto_requeue=True)])
    with Interruptions() as interruptions:
        connector = trainer._signal_connector
        connector.register_signal_handlers()
        try:
            requeue = signal.getsignal(signal.SIGUSR1).signal_handlers
            on_term = signal.getsignal(signal.SIGTERM).signal_handlers
            assert requeue == [connector._slurm_sigusr_handler_fn]
            assert on_term[:2] == [connector._sigterm_notifier_fn, connector._sigterm_handler_fn]
            assert on_term[2] == interruptions.handle  # ours runs after Lightning's
        finally:
            connector.teardown()
