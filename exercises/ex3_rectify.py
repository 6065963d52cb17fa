"""Exercise 3 — L_rectify: the self-adversarial signal (≈ 25 min).

TwinFlow paper, Eq. (10). On the one-step samples x_fake, with fresh z' and τ' ~ U(0, 1) and NO
gradient through the network calls:
    x_τ' = τ'·z' + (1 − τ')·x_fake
    Δv = F(x_τ', −τ', −τ') − F(x_τ', τ', τ')      fake velocity − real velocity, clamped to [−clamp, clamp]
    L  = ‖F_one_step − sg(F_one_step − Δv)‖²       sg = stop-gradient (detach)
F_one_step = F(z, 1, 0) is the one-step output that produced x_fake (it carries the gradient).

Check your answer:  pytest exercises -k rectify
"""
import torch


def rectify_loss(model, F_one_step, x_fake, cond, clamp=1.0):
    """Per-sample L_rectify, shape (B,). cond: a dict of keyword arguments for the model.
    Its gradient with respect to F_one_step should be proportional to +Δv."""
    # TODO: your code here
    raise NotImplementedError("exercise 3: write rectify_loss() in exercises/ex3_rectify.py")
