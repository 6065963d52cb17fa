"""The self-checks: each compares a learner's function with the reference (common.py) on random
inputs, and says WHAT is wrong when it differs (shape, sign, missing stop-gradient, time branch...).
Learners run them through `pytest exercises -k NAME`; CI checks that every checker passes on the
reference and catches planted wrong answers (tests/test_exercise_checkers.py)."""
import torch
import torch.nn as nn

import common


def expect(condition, message):
    if not condition:
        raise AssertionError(message)


def close(a, b, tol=1e-5):
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def call(fn, *args, **kwargs):
    """Run the learner's function; an unsolved stub or a crash becomes a one-line failure."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as e:
        raise AssertionError(f"not solved yet: {e}") from None
    except Exception as e:
        shapes = ", ".join(str(tuple(a.shape)) for a in args if torch.is_tensor(a))
        raise AssertionError(f"{fn.__name__} crashed on inputs of shapes {shapes}: "
                             f"{type(e).__name__}: {e}") from None


class TinyModel(nn.Module):
    """A small random network F(x_t, t, tt, y) for any x shape; it records every call."""

    def __init__(self, shape, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        dim = int(torch.tensor(shape).prod())
        self.net = nn.Sequential(nn.Linear(dim + 5, 32), nn.Tanh(), nn.Linear(32, dim))
        self.calls = []

    def forward(self, x_t, t, tt, y=None):
        self.calls.append({"x_t": x_t.detach().clone(), "t": t.detach().clone(), "tt": tt.detach().clone(), "y": y})
        y = torch.zeros_like(t) if y is None else y.float() / 10
        features = torch.stack([t, tt, torch.sin(3 * t), torch.sin(3 * tt), y], 1)
        return self.net(torch.cat([x_t.flatten(1), features], 1)).view_as(x_t)


# ----------------------------------------------------------------------------------------------
# Exercise 1: interpolate, predict
# ----------------------------------------------------------------------------------------------
def check_interpolate(interpolate):
    x, z = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.0, 1.0, 0.3])
    out = call(interpolate, x, z, t)
    expect(torch.is_tensor(out) and out.shape == x.shape,
           f"shape: expected {tuple(x.shape)} for images of that shape and t of shape (3,), got "
           f"{getattr(out, 'shape', type(out))}; reshape t to (B, 1, 1, 1) so it broadcasts")
    expect(not close(out[0], z[0]), "swapped ends: at t = 0 you return the noise; data x sits at t = 0, noise z at t = 1")
    expect(close(out[0], x[0]) and close(out[1], z[1]), "ends: x_t must be x at t = 0 and z at t = 1")
    expect(close(out[2], 0.3 * z[2] + 0.7 * x[2]), "x_t = t·z + (1 − t)·x does not hold at t = 0.3")
    negative = call(interpolate, x, z, -t)
    expect(close(negative, out), "negative time: the fake trajectory at −t is the SAME point as t: use |t|")
    points = call(interpolate, x.flatten(1), z.flatten(1), t)
    expect(close(points, out.flatten(1)), "shape-agnostic: (B, D) inputs must work like images do")


def check_predict(predict):
    shape = (4, 3, 2)
    model = TinyModel(shape)
    x_t, t, tt, y = torch.randn(8, *shape), torch.rand(8) * 2 - 1, torch.rand(8), torch.arange(8)
    result = call(predict, model, x_t, t, tt, y=y)
    expect(isinstance(result, tuple) and len(result) == 3, "return the tuple (x̂, ẑ, F)")
    x_hat, z_hat, F = result
    expect(len(model.calls) == 1, f"one network call, not {len(model.calls)}")
    expect(model.calls[0]["y"] is y, "pass the conditioning (**cond) through to the model")
    expect(close(model.calls[0]["t"], t), "call the model with the SIGNED time t: the sign picks the trajectory")
    expected_x, expected_z, expected_F = common.predict(model, x_t, t, tt, y=y)
    expect(close(F, expected_F), "F must be the model's output, unchanged")
    expect(not close(x_hat, x_t + common.expand(t.abs(), F) * F), "sign: x̂ = x_t − |t|·F (you added)")
    expect(not close(x_hat, x_t - common.expand(t, F) * F), "time branch: use |t|, not t (t < 0 is the fake trajectory)")
    expect(close(x_hat, expected_x), "x̂ = x_t − |t|·F does not hold")
    expect(close(z_hat, expected_z), "ẑ = x_t + (1 − |t|)·F does not hold")
    half = lambda *a, **k: model(*a, **k).to(torch.bfloat16)  # a model running in bf16
    expect(all(v.dtype == torch.float32 for v in call(predict, half, x_t, t, tt, y=y)),
           "dtype: cast F to float32 before the arithmetic (models may return bf16)")


# ----------------------------------------------------------------------------------------------
# Exercise 2: L_adv
# ----------------------------------------------------------------------------------------------
def check_adversarial_loss(adversarial_loss):
    B, shape = 256, (3, 2, 2)
    model = TinyModel(shape)
    z, y = torch.randn(B, *shape), torch.arange(B) % 10
    x_fake = 2 + 0.5 * torch.randn(B, *shape)  # off the noise's scale, so an un-noised x_fake is told from noise
    loss = call(adversarial_loss, model, z, x_fake, y=y)
    expect(torch.is_tensor(loss) and loss.shape == (B,),
           f"return the per-sample loss, shape ({B},): average over every dim but the batch")
    expect(len(model.calls) >= 1, "call the model")
    record = model.calls[-1]
    expect(bool((record["t"] < 0).all()), "time: call the model at NEGATIVE time −τ, the fake trajectory "
                                          "(at +τ it would learn its own samples as if they were real data)")
    expect(close(record["tt"], record["t"]), "target time: tt = t = −τ (the instantaneous velocity)")
    expect(record["t"].abs().std() > 0.15, "noise level: draw τ ~ U(0, 1) afresh for every sample, "
                                          "not one fixed τ (the fake branch must learn every level)")
    expect(record["y"] is not None and torch.equal(record["y"], y), "pass the conditioning (**cond) to the model")
    tau = common.expand(record["t"].abs(), x_fake)
    z_new = (record["x_t"] - (1 - tau) * x_fake) / tau
    reused = ((z_new - z).abs() < 1e-2).float().mean() > 0.9
    expect(not reused, "noise: you reused z, the noise x_fake came from; draw FRESH z' "
                                      "(reusing it learns a coupled, reflow-like field)")
    expect(abs(z_new.mean()) < 0.2 and abs(z_new.std() - 1) < 0.2,
           "x_τ is not τ·z' + (1 − τ)·x_fake with Gaussian z' (check the ends of the line)")
    F = model(record["x_t"], record["t"], record["tt"], y=y).detach()
    expect(not close(loss, common.per_sample_mse(F, x_fake - z_new), 1e-4),
           "target sign: the velocity is z' − x_fake (noise minus data)")
    expect(close(loss, common.per_sample_mse(F, z_new - x_fake), 1e-4), "L_adv = ‖F(x_τ, −τ, −τ) − (z' − x_fake)‖² does not hold")
    expect(loss.requires_grad, "no gradient reaches the model: L_adv trains the network (do not wrap it in no_grad)")
    loss.mean().backward()
    expect(any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()),
           "no gradient reaches the model: L_adv trains the network (do not wrap it in no_grad)")


# ----------------------------------------------------------------------------------------------
# Exercise 3: L_rectify
# ----------------------------------------------------------------------------------------------
class SignModel(nn.Module):
    """F(x, t, tt) = x·W + sign(t)·c: at the same point, fake − real = −2c for any noise draw."""

    def __init__(self, dim, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.W, self.c = nn.Parameter(torch.randn(dim, dim) / dim), nn.Parameter(0.6 * torch.randn(dim))
        self.calls = []

    def forward(self, x_t, t, tt, y=None):
        self.calls.append({"x_t": x_t.detach().clone(), "t": t.detach().clone(), "tt": tt.detach().clone(), "y": y})
        return x_t @ self.W + torch.sign(t)[:, None] * self.c


def check_rectify_loss(rectify_loss, clamp=1.0):
    B, D = 32, 8
    model = SignModel(D)
    F_one_step = torch.randn(B, D, requires_grad=True)
    x_fake = 2 + 0.5 * torch.randn(B, D)  # off the noise's scale, so x_τ' = x_fake is told from noise
    y = torch.arange(B) % 10
    loss = call(rectify_loss, model, F_one_step, x_fake, {"y": y}, clamp=clamp)
    expect(torch.is_tensor(loss) and loss.shape == (B,), f"return the per-sample loss, shape ({B},)")
    signs = sorted({int(s) for call_ in model.calls for s in torch.sign(call_["t"])})
    expect(signs == [-1, 1], "time branches: Δv needs one call at −τ' (fake) and one at +τ' (real)")
    delta_v = (-2 * model.c.detach()).expand(B, D)
    expect(loss.abs().sum() > 0, "Δv is zero: the two calls must differ only in the SIGN of time")
    if not close(loss, common.per_sample_mse(delta_v.clamp(-clamp, clamp), torch.zeros_like(delta_v)), 1e-4):
        expect(not close(loss, delta_v.pow(2).mean(1), 1e-4), f"clamp: Δv must be clamped to [−{clamp}, {clamp}]")
        expect(not close(loss, delta_v.clamp(-1, 1).pow(2).mean(1), 1e-4),
               f"clamp: use the clamp argument ({clamp}), not a fixed ±1")
        raise AssertionError("the value differs from ‖Δv‖² (mean over dims): with F_one_step − sg(F_one_step − Δv) "
                             "the loss equals the mean of Δv² — are both calls made at the same point x_τ'?")
    # Every row the model saw, whether in two calls or in one batched call: fake rows (t < 0), real rows
    expect(all(c["y"] is not None for c in model.calls), "pass the conditioning (**cond) to both calls")
    rows = {key: torch.cat([c[key] for c in model.calls]) for key in ("x_t", "t", "tt", "y")}
    expect(close(rows["tt"], rows["t"]), "target time: call the model with tt = t (±τ'): Δv compares "
                                         "instantaneous velocities")
    fake, real = rows["t"] < 0, rows["t"] > 0
    expect(fake.sum() == real.sum() == B and close(rows["x_t"][fake], rows["x_t"][real])
           and close(rows["t"][fake], -rows["t"][real]),
           "both branches must see the same point x_τ' and the same τ', with opposite signs of time")
    expect(torch.equal(rows["y"][fake], y) and torch.equal(rows["y"][real], y),
           "conditioning: each sample's cond must go with its own row, in both branches")
    tau = common.expand(rows["t"][real], x_fake)
    expect(bool((tau > 0).all() and (tau <= 1).all()) and rows["t"][real].std() > 0.15,
           "noise level: draw τ' ~ U(0, 1) afresh for every sample, not one fixed τ'")
    z_new = (rows["x_t"][real] - (1 - tau) * x_fake) / tau
    expect(abs(z_new.mean()) < 0.25 and abs(z_new.std() - 1) < 0.25,
           "x_τ' is not τ'·z' + (1 − τ')·x_fake with Gaussian z': noise the one-step samples first")
    loss.sum().backward()
    expect(F_one_step.grad is not None and F_one_step.grad.abs().sum() > 0,
           "no gradient reaches F_one_step: detach only the target sg(F_one_step − Δv), not F_one_step")
    expected_grad = 2 * delta_v.clamp(-clamp, clamp) / D
    expect(not close(F_one_step.grad, -expected_grad, 1e-4),
           "sign: the gradient points along −Δv, so the samples would move AWAY from the real data; "
           "Δv = F(x, −τ', −τ') − F(x, τ', τ') (fake − real) and the target is sg(F_one_step − Δv)")
    expect(close(F_one_step.grad, expected_grad, 1e-4), "the gradient with respect to F_one_step is not 2·Δv/D")
    expect(all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters()),
           "missing stop-gradient: compute Δv under torch.no_grad(); L_rectify trains only through F_one_step")


# ----------------------------------------------------------------------------------------------
# Exercise 4: the base target
# ----------------------------------------------------------------------------------------------
def base_target_inputs(B=64, shape=(2, 3)):
    torch.manual_seed(1)
    t = torch.rand(B) * 0.9 + 0.1
    tt = t * torch.rand(B)
    tt[:8] = (t[:8] - 0.004).clamp(min=0)  # near-instant jumps: t − tt < Δt
    tt[8:12] = t[8:12]  # no jump at all
    t[12], tt[12] = 0.0, 0.0  # at the data end
    F, x_t, v_star = torch.randn(B, *shape), torch.randn(B, *shape), torch.randn(B, *shape)
    return F, x_t, t, tt, v_star, {"y": torch.arange(B) % 10}


def check_base_target(base_target):
    shape = (2, 3)
    ema = TinyModel(shape)  # parameters require grad on purpose: the target must not
    F, x_t, t, tt, v_star, cond = base_target_inputs(shape=shape)
    target = call(base_target, ema, F, x_t, t, tt, v_star, cond, order=2)
    expect(torch.is_tensor(target) and target.shape == F.shape, f"shape: the target has F's shape {tuple(F.shape)}")
    expect(bool(torch.isfinite(target).all()), "inf/NaN: where t = tt you must not divide by t − tt")
    expect(not target.requires_grad, "the target carries gradient: build it under torch.no_grad()")
    near = (t - tt) < common.DT
    expect(close(target[near], v_star[near]), "near-instant jumps (t − tt < Δt) must get plain flow matching: target = v*")
    far = ~near
    expect(bool(((F - target)[far].abs() <= 1 + 1e-5).all()), "clamp: F − target = clamp(ρ) must lie in [−1, 1]")
    expected = common.base_target(ema, F, x_t, t, tt, v_star, cond, order=2)
    if not close(target[far], expected[far], 1e-4):
        one_step = common.base_target(ema, F, x_t, t, tt, v_star, cond, order=1)
        expect(not close(target[far], one_step[far], 1e-4), "order: integrate t_m → tt in `order` sub-steps, not one")
        raise AssertionError(f"far jumps differ from the reference by up to "
                             f"{(target[far] - expected[far]).abs().max():.3g}: check the step back x' = x_t − Δt·v*, "
                             f"t_m = max(t − Δt, tt), and ρ = ((t − tt)·F − Δt·v* − P)/Δt")
    for order in (1, 3):
        expect(close(call(base_target, ema, F, x_t, t, tt, v_star, cond, order=order),
                     common.base_target(ema, F, x_t, t, tt, v_star, cond, order=order), 1e-4),
               f"order={order} does not match the reference: use `order` equal sub-steps")
    expect(all(c["y"] is not None for c in ema.calls), "pass cond to the EMA model")


# ----------------------------------------------------------------------------------------------
# Exercise 5: the order-2 sampler
# ----------------------------------------------------------------------------------------------
def check_sample_heun(sample_heun):
    shape = (2, 3)
    model = TinyModel(shape)
    z, y = torch.randn(16, *shape), torch.arange(16) % 10
    for steps in (1, 4):
        model.calls.clear()
        x = call(sample_heun, model, z, steps, y=y)
        n = len(model.calls)
        expect(n != steps or steps == 1, f"{n} calls for {steps} steps: that is Euler; add Heun's correction")
        expect(n != 2 * steps, f"{n} calls for {steps} steps: the last step (to t = 0) gets no correction")
        expect(n == 2 * steps - 1, f"{n} calls for {steps} steps: expected 2·steps − 1 = {2 * steps - 1}")
        expect(all(close(c["tt"], c["t"]) and bool((c["t"] > 0).all()) for c in model.calls),
               "times: on the real trajectory call the model with t > 0 and tt = t")
        expect(torch.is_tensor(x) and x.shape == z.shape, f"shape: return x shaped like z {tuple(z.shape)}")
        expected = common.sample(model, z, steps=steps, style="mul", order=2, cond={"y": y})
        expect(close(x, expected, 1e-4), f"steps={steps}: differs from the reference by up to "
                                          f"{(x - expected).abs().max():.3g}; check the grid 1 − i/steps and the average")


# ----------------------------------------------------------------------------------------------
# Exercise 6: the enhanced target
# ----------------------------------------------------------------------------------------------
def check_enhanced_velocity(enhanced_velocity):
    shape = (4,)
    ema = TinyModel(shape)
    B = 32
    x, z, t = torch.randn(B, *shape), torch.randn(B, *shape), torch.rand(B)
    x_t = common.interpolate(x, z, t)
    cond, null = {"y": torch.arange(B) % 10}, {"y": torch.full((B,), 10)}
    expect(close(call(enhanced_velocity, ema, x_t, t, x, z, cond, null, 0.0), z - x),
           "κ = 0 must give the plain velocity z − x (noise minus data)")
    ema.calls.clear()
    v = call(enhanced_velocity, ema, x_t, t, x, z, cond, null, 0.5)
    expect(torch.is_tensor(v) and v.shape == x.shape, f"shape: expected {tuple(x.shape)}")
    expect(not v.requires_grad, "the target carries gradient: compute it under torch.no_grad()")
    # every row the EMA saw, in two calls or in one batched call: B rows of null_cond, B rows of cond
    expect(all(c["y"] is not None for c in ema.calls), "pass cond / null_cond to every EMA call")
    labels = torch.cat([c["y"] for c in ema.calls]) if ema.calls else torch.zeros(0)
    is_null = labels == null["y"][0]
    expect(is_null.sum() == B, "use null_cond for the unconditional call (a real null class, not shuffled labels)")
    expect(torch.equal(labels[~is_null], cond["y"]), "use cond for the conditional call")
    expected = common.enhanced_velocity(ema, x_t, t, x, z, cond, null, 0.5)
    guidance = 2 * (expected - (z - x))
    expect(not close(v, z - x - guidance / 2, 1e-4), "sign: add κ·(F(cond) − F(null)), which points towards the class")
    expect(close(v, expected, 1e-4), "v* = (z − x) + κ·(F⁻(x_t, t, t | cond) − F⁻(x_t, t, t | null)) does not hold "
                                     "(same x_t, same time t = tt for both calls)")
