"""Faults the training-script tests inject into `training_loss`, one definition for every script."""
import contextlib
import os
import signal

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


def nan_loss(*args, **kwargs):
    """Stands in for training_loss: the loss is NaN."""
    return torch.tensor(float("nan"), requires_grad=True), {}


def infinite_gradient(training_loss):
    """training_loss whose loss value stays finite but whose gradient is infinite."""
    def wrapped(*args, **kwargs):
        loss, terms = training_loss(*args, **kwargs)
        loss.register_hook(lambda grad: grad * float("inf"))
        return loss, terms
    return wrapped


def ctrl_c_during_call(training_loss, call, sig=signal.SIGINT):
    """training_loss, with Ctrl-C (or another signal, e.g. a scheduler's SIGTERM) sent to this
    process during its call-th call: in the middle of step call − 1 (steps count from 0)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), sig)
        return training_loss(*args, **kwargs)
    return wrapped


@contextlib.contextmanager
def counting_optimizer_steps():
    """Counts the optimizer steps (of any optimizer) taken inside the block: a bad step must stop
    BEFORE the update, not after it."""
    steps = []
    handle = register_optimizer_step_pre_hook(lambda *args: steps.append(1))
    try:
        yield steps
    finally:
        handle.remove()


def failing_save(obj, f, *args, **kwargs):
    """Stands in for torch.save: writes the start of the file, then fails like a full disk."""
    if isinstance(f, (str, os.PathLike)):  # (DCP saves into in-memory buffers: those get nothing)
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
    raise OSError(28, "No space left on device")
