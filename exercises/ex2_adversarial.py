"""Exercise 2 — L_adv: teach the network its OWN samples' flow, on the fake trajectory (≈ 20 min).

TwinFlow paper, Eq. (8). x_fake = z − F(z, 1, 0) are the model's one-step samples. The same
network, asked at NEGATIVE time, learns the flow from noise to x_fake:
    x_τ = τ·z' + (1 − τ)·x_fake,   τ ~ U(0, 1),  z' ~ N(0, I)
    L_adv = ‖F(x_τ, −τ, −τ) − (z' − x_fake)‖²     (mean over every dim except the batch)

Check your answer:  pytest exercises -k adversarial
"""
import torch


def adversarial_loss(model, z, x_fake, **cond):
    """Per-sample L_adv, shape (B,), with gradient into the model.

    z is the noise x_fake was generated from. Think about whether you should use it.
    You may use interpolate() from exercise 1 (or from common.py)."""
    # TODO: your code here
    raise NotImplementedError("exercise 2: write adversarial_loss() in exercises/ex2_adversarial.py")
