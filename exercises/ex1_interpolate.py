"""Exercise 1 — the interpolation and its inversion (≈ 15 min).

TwinFlow, like every flow-matching method, moves along straight lines between data x (t = 0) and
noise z (t = 1). Time is SIGNED: t < 0 is the twin (fake) trajectory, but the point on the line is
the same for t and −t — only the network is told the sign.

Check your answer:  pytest exercises -k interpolate   and   pytest exercises -k predict
The reference is common.py (interpolate, predict): read it only after trying.
"""
import torch


def interpolate(x, z, t):
    """x_t = |t|·z + (1 − |t|)·x.

    x, z: (B, ...) any shape (points, images, latents); t: (B,) in [−1, 1].
    Hint: t must be reshaped to (B, 1, ..., 1) to broadcast against x."""
    # TODO: your code here
    raise NotImplementedError("exercise 1: write interpolate() in exercises/ex1_interpolate.py")


def predict(model, x_t, t, tt, **cond):
    """One network call F = model(x_t, t, tt, **cond), inverted to both ends of the line:
        x̂ = x_t − |t|·F        (the data the velocity points back to)
        ẑ = x_t + (1 − |t|)·F  (the noise it points forward to)
    Return (x̂, ẑ, F), all in float32 (the model may run in bf16)."""
    # TODO: your code here
    raise NotImplementedError("exercise 1: write predict() in exercises/ex1_interpolate.py")
