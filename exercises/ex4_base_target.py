"""Exercise 4 — the base (RCGM consistency) target (≈ 40 min, the hardest).

For a jump t → tt (0 ≤ tt ≤ t ≤ 1), build the regression target for F(x_t, t, tt) with the EMA
model F⁻ and the finite-difference step Δt = DT = 0.01, all without gradient:
  1. step back along the target velocity:  x' = x_t − Δt·v*,   t_m = max(t − Δt, tt)
  2. integrate t_m → tt in `order` equal sub-steps (t_c → t_n) with F⁻(x, t_c, t_n):
         x ← x − (t_c − t_n)·F⁻,     P ← P + (t_c − t_n)·F⁻
  3. residual  ρ = ((t − tt)·F − Δt·v* − P) / Δt, clamped to [−1, 1];  target = F − clamp(ρ)
  4. where t − tt < Δt (a near-instant jump) the target is plain flow matching: v*, unclamped.
It must never produce inf or NaN, also when t = tt exactly.

Check your answer:  pytest exercises -k base_target
"""
import torch

DT = 0.01


def base_target(ema_model, F, x_t, t, tt, v_star, cond, order=2):
    """The target, same shape as F. F: the online model's prediction F(x_t, t, tt), detached.
    t, tt: (B,). v_star: the target velocity z − x (or the guided one). cond: dict for the model."""
    # TODO: your code here
    raise NotImplementedError("exercise 4: write base_target() in exercises/ex4_base_target.py")
