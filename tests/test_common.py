"""Behaviour of the TwinFlow loss and the sampler in common.py, on tiny models."""
import copy

import pytest
import torch
import torch.nn as nn

from common import (base_target, enhanced_velocity, interpolate, predict, rectify_loss, sample,
                    time_grid, training_loss, update_ema)


class TinyNet(nn.Module):
    """A velocity model for any x shape: a per-feature MLP on (x, t, tt, label)."""

    def __init__(self, features, width=32, sign_aware=True, classes=0):
        super().__init__()
        self.sign_aware = sign_aware
        self.net = nn.Sequential(nn.Linear(features + 2, width), nn.SiLU(), nn.Linear(width, features))
        self.embed = nn.Embedding(classes + 1, features + 2) if classes else None

    def forward(self, x_t, t, tt, y=None):
        if not self.sign_aware:  # blind to the trajectory: the fake and real branches coincide
            t, tt = t.abs(), tt.abs()
        h = torch.cat([x_t.flatten(1), t[:, None], tt[:, None]], 1).to(x_t.dtype)
        if self.embed is not None:
            h = h + self.embed(y)
        return self.net(h).reshape(x_t.shape)


class Spy(nn.Module):
    """Records the (t, tt) of every call and whether it was made with gradient."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x_t, t, tt, **cond):
        self.calls.append((t.detach().clone(), tt.detach().clone(), torch.is_grad_enabled(), len(x_t)))
        return self.model(x_t, t, tt, **cond)


SHAPES = [(8, 2), (8, 3, 4, 4), (8, 5, 6)]  # points, images, packed latents


def make(shape, seed=0, **kw):
    torch.manual_seed(seed)
    features = int(torch.tensor(shape[1:]).prod())
    model = TinyNet(features, **kw)
    return model, copy.deepcopy(model).requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Contract: shapes, dtypes, inversion
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["flow", "rcgm", "twinflow"])
def test_loss_shapes_dtypes_and_gradient(shape, method):
    model, ema = make(shape)
    loss, logs = training_loss(model, ema, torch.randn(shape), method=method)
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    expected = {"flow": {"loss", "flow"}, "rcgm": {"loss", "base"},
                "twinflow": {"loss", "base", "adv", "rectify"}}[method]
    assert set(logs) == expected and all(not v.requires_grad for v in logs.values())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.grad is None for p in ema.parameters())


@pytest.mark.parametrize("shape", SHAPES)
def test_sample_shape_and_dtype(shape):
    model, _ = make(shape)
    for steps, style, order in [(1, "few", 1), (3, "any", 1), (4, "mul", 2)]:
        out = sample(model, torch.randn(shape), steps=steps, style=style, order=order)
        assert out.shape == shape and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_x_hat_z_hat_invert_exactly(sign):
    model, _ = make((16, 2))
    x_t = torch.randn(16, 2)
    t = sign * torch.rand(16)
    x_hat, z_hat, F = predict(model, x_t, t, t)
    torch.testing.assert_close(interpolate(x_hat, z_hat, t), x_t)  # x_t = |t|·ẑ + (1 − |t|)·x̂
    torch.testing.assert_close(z_hat - x_hat, F)  # the velocity is ẑ − x̂


def test_interpolation_endpoints():
    x, z = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(interpolate(x, z, torch.zeros(4)), x)
    torch.testing.assert_close(interpolate(x, z, torch.ones(4)), z)
    torch.testing.assert_close(interpolate(x, z, -torch.ones(4)), z)


# ----------------------------------------------------------------------------------------------
# The base (RCGM) target
# ----------------------------------------------------------------------------------------------
def test_base_target_is_flow_matching_when_tt_near_t():
    model, ema = make((32, 2))
    x_t, v_star, F = torch.randn(32, 2), torch.randn(32, 2), torch.randn(32, 2)
    t = torch.rand(32) * 0.98 + 0.01
    for gap in [0.0, 1e-4, 0.005, 0.0099]:  # t − tt < Δt: plain flow matching, target = v*
        target = base_target(ema, F, x_t, t, t - gap, v_star, {})
        torch.testing.assert_close(target, v_star)


@pytest.mark.parametrize("t,tt", [(0.0, 0.0), (1.0, 1.0), (1.0, 0.0), (0.5, 0.5), (0.01, 0.0),
                                  (1e-7, 0.0), (0.3, 0.29)])
def test_base_target_finite_at_the_edges(t, tt):
    model, ema = make((8, 2))
    t_, tt_ = torch.full((8,), t), torch.full((8,), tt)
    target = base_target(ema, torch.randn(8, 2), torch.randn(8, 2), t_, tt_, torch.randn(8, 2), {})
    assert torch.isfinite(target).all()


class ConstantVelocity(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, x_t, t, tt):
        return self.v.expand_as(x_t)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_base_target_fixed_point_on_a_straight_flow(order):
    """If every velocity along the path is the same c, the consistent jump velocity is c."""
    c = torch.randn(1, 2)
    t = torch.rand(64) * 0.9 + 0.1
    tt = t * torch.rand(64)
    F = c.expand(64, 2)
    target = base_target(ConstantVelocity(c), F, torch.randn(64, 2), t, tt, F, {}, order)
    torch.testing.assert_close(target, F, atol=1e-4, rtol=1e-4)  # ρ divides float32 error by Δt


class GaussianFlow(nn.Module):
    """The exact any-step velocity of the flow from z ~ N(0, 1) to data x ~ N(0, s²): the marginal
    std is σ(t) = √(t² + (1 − t)²s²) and every ODE path is x_t ∝ σ(t), so the jump t → tt is
    F = x_t·(1 − σ(tt)/σ(t))/(t − tt), and at tt = t the velocity x_t·σ'(t)/σ(t)."""
    s = 0.3

    def sigma(self, t):
        return (t**2 + (1 - t) ** 2 * self.s**2).sqrt()

    def forward(self, x_t, t, tt):
        t, tt = t.abs().double()[:, None], tt.abs().double()[:, None]
        instant = x_t * (t - (1 - t) * self.s**2) / self.sigma(t) ** 2
        gap = torch.where(t == tt, torch.ones_like(t), t - tt)
        jump = x_t * (1 - self.sigma(tt) / self.sigma(t)) / gap
        return torch.where(t == tt, instant, jump).float()


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("plain", [False, True])
def test_an_exact_any_step_model_is_a_fixed_point_of_the_base_target(plain, order):
    """Unlike a constant field, this one depends on x, so the step back x_t − Δt·v*, the direction
    of each sub-step and the sum P must all be right for F* to equal the model's own jump."""
    exact = GaussianFlow()
    x_t, t = torch.randn(256, 2), torch.rand(256) * 0.5 + 0.5  # (below 0.5 the paths bend more)
    tt = t * torch.rand(256) * 0.8  # every jump longer than Δt
    F = exact(x_t, t, tt)
    v_star = exact(x_t, t, t)  # the conditional mean of z − x, the target's expectation
    target = lambda v: base_target(exact, F, x_t, t, tt, v, {}, order=order, plain=torch.full((256,), plain))
    # The step back is a first-order finite difference: its O(Δt²) error is O(Δt) in ρ.
    tolerance = 0.004 if plain else 0.03
    torch.testing.assert_close(target(v_star), F, atol=tolerance, rtol=0)
    assert (target(-v_star) - F).abs().mean() > 5 * tolerance  # a step back the wrong way is far off


def test_base_target_clamps_the_consistency_residual():
    c = torch.zeros(1, 2)
    t, tt = torch.ones(4), torch.zeros(4)
    F = torch.full((4, 2), 5.0)  # far from the consistent velocity 0: ρ = 100·5, clamped to 1
    target = base_target(ConstantVelocity(c), F, torch.randn(4, 2), t, tt, torch.zeros(4, 2), {})
    torch.testing.assert_close(target, F - 1)


# ----------------------------------------------------------------------------------------------
# L_rectify, L_adv and the enhanced target
# ----------------------------------------------------------------------------------------------
def rectify_grads(sign_aware):
    model, _ = make((16, 2), sign_aware=sign_aware)
    z = torch.randn(16, 2)
    F_one = model(z, torch.ones(16), torch.zeros(16))
    rectify_loss(model, F_one, (z - F_one).detach(), {}).mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_rectify_gradient_vanishes_when_fake_and_real_branches_agree():
    assert rectify_grads(sign_aware=False).abs().max() == 0  # Δv = 0 exactly
    assert rectify_grads(sign_aware=True).abs().max() > 0


def test_rectify_gradient_points_along_delta_v():
    """d/dF of ‖F − sg(F − Δv)‖² is 2Δv/numel: descent moves x̂ = z − F along +Δv."""
    torch.manual_seed(0)
    model, _ = make((4, 2))
    F_one = torch.randn(4, 2, requires_grad=True)
    x_fake = torch.randn(4, 2)
    torch.manual_seed(1)
    rectify_loss(model, F_one, x_fake, {}).sum().backward()
    torch.manual_seed(1)  # replay the same z', τ' to rebuild Δv by hand
    z, tau = torch.randn_like(x_fake), torch.rand(4)
    x_tau = interpolate(x_fake, z, tau)
    delta_v = (model(x_tau, -tau, -tau) - model(x_tau, tau, tau)).clamp(-1, 1)
    torch.testing.assert_close(F_one.grad, 2 * delta_v.detach() / 2)  # 2Δv / numel, numel = 2


def test_negative_time_reaches_the_model_only_in_twinflow():
    for method, expect_negative in [("flow", False), ("rcgm", False), ("twinflow", True)]:
        model, ema = make((16, 2))
        spy = Spy(model)
        training_loss(spy, ema, torch.randn(16, 2), method=method)
        with_grad = [c for c in spy.calls if c[2]]
        assert len(with_grad) == 1, "one forward pass with gradient per step"
        t, tt = with_grad[0][0], with_grad[0][1]
        assert bool((t < 0).any()) == expect_negative
        assert ((t < 0) == (tt < 0)).all(), "t and tt share their sign"


def test_twinflow_split_parts():
    model, ema = make((16, 2))
    spy = Spy(model)
    training_loss(spy, ema, torch.randn(16, 2), method="twinflow")
    t, tt, _, n = next(c for c in spy.calls if c[2])
    assert n == 16
    torch.testing.assert_close(t[:4], torch.ones(4))  # one-step part: (1, 0)
    torch.testing.assert_close(tt[:4], torch.zeros(4))
    assert ((tt[4:8] <= t[4:8]) & (tt[4:8] >= 0.95 * t[4:8])).all()  # multi: a near-instant jump
    assert ((tt[8:12] <= t[8:12]) & (tt[8:12] >= 0)).all()  # any-step
    torch.testing.assert_close(t[12:], tt[12:])  # adversarial: t = tt = −τ
    assert (t[12:] <= 0).all()


def test_the_real_parts_are_noised_at_their_own_time():
    """Every real row of the pass with gradient is x_t = t·z + (1 − t)·x with z ~ N(0, 1) drawn for
    it: with all data at x = 5, z = (x_t − (1 − t)·5)/t must look like standard noise."""
    model, ema = make((4096, 2))
    recorder = Recorder(model)
    training_loss(recorder, ema, torch.full((4096, 2), 5.0), method="twinflow")
    (x_t, t, tt, _, _), = [c for c in recorder.calls if c[3]]
    real = t > 0
    z = (x_t[real] - (1 - t[real, None]) * 5.0) / t[real, None]
    assert real.sum() == 3072 and abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1


def test_each_call_gets_the_labels_of_its_own_rows():
    """The fake samples are made with the labels that the adversarial rows then train with, and Δv
    is read with the labels of the one-step rows whose samples it moves."""
    model, ema = make((16, 2), classes=16)
    calls = []

    def spy(x_t, t, tt, y):
        calls.append((t, tt, y, torch.is_grad_enabled()))
        return model(x_t, t, tt, y)
    training_loss(spy, ema, torch.randn(16, 2), method="twinflow", cond={"y": torch.arange(16)})
    (t, tt, y, _), = [c for c in calls if c[3]]
    (_, _, y_generated, _), = [c for c in calls if not c[3] and (c[0] == 1).all() and (c[1] == 0).all()]
    rectify = [c for c in calls if not c[3] and (c[0] == c[1]).all()]
    assert torch.equal(y_generated, y[t < 0]) and torch.equal(y[t < 0], torch.arange(12, 16))
    assert len(rectify) == 2 and all(torch.equal(c[2], y[t == 1]) for c in rectify)


def test_rectify_weight_scales_the_rectify_term_and_its_gradient():
    """rectify_weight w adds w·L_rectify to the loss and changes no draw; its gradient reaches the
    one-step rows (the value of ‖F − sg(F − Δv)‖² is ‖Δv‖², but its gradient is 2·Δv·∂F)."""
    model, ema = make((16, 2))
    x, results = torch.randn(16, 2), {}
    for weight in (0.5, 0.0):
        torch.manual_seed(5)
        model.zero_grad()
        loss, logs = training_loss(model, ema, x, method="twinflow", rectify_weight=weight)
        loss.backward()
        results[weight] = loss, logs, [p.grad.clone() for p in model.parameters()]
    (loss_half, logs_half, grads_half), (loss_0, logs_0, grads_0) = results.values()
    assert torch.equal(logs_half["rectify"], logs_0["rectify"]) and logs_half["rectify"] > 0
    torch.testing.assert_close(loss_half - loss_0, 0.5 * logs_half["rectify"])
    assert any(not torch.allclose(a, b) for a, b in zip(grads_half, grads_0))


def test_split_false_runs_every_part_on_the_whole_batch():
    model, ema = make((8, 2))
    spy = Spy(model)
    training_loss(spy, ema, torch.randn(8, 2), method="twinflow", split=False)
    assert next(c for c in spy.calls if c[2])[3] == 32


def test_batch_too_small_and_bad_method_are_clear_errors():
    model, ema = make((3, 2))
    with pytest.raises(ValueError, match="batch 3 is too small"):
        training_loss(model, ema, torch.randn(3, 2), method="twinflow")
    with pytest.raises(ValueError, match="method must be"):
        training_loss(model, ema, torch.randn(3, 2), method="gan")
    with pytest.raises(ValueError, match="null_cond"):
        training_loss(model, ema, torch.randn(4, 2), method="flow", kappa=0.5)
    loss, _ = training_loss(model, ema, torch.randn(3, 2), method="twinflow", split=False)  # whole batch each
    assert torch.isfinite(loss)


def test_conditioning_must_have_a_row_per_sample():
    """A shared (1,) null label, or labels for a bigger batch, would be sliced wrongly without a word."""
    model, ema = make((8, 2), classes=3)
    y = torch.arange(8) % 3
    with pytest.raises(ValueError, match=r"null_cond\['y'\] has 1 rows, the batch 8"):
        training_loss(model, ema, torch.randn(8, 2), cond={"y": y}, null_cond={"y": torch.tensor([3])}, kappa=0.5)
    with pytest.raises(ValueError, match=r"cond\['y'\] has 16 rows, the batch 8"):
        training_loss(model, ema, torch.randn(8, 2), cond={"y": torch.arange(16) % 3})


def test_enhanced_velocity_uses_the_null_class():
    torch.manual_seed(0)
    model = TinyNet(2, classes=3)
    x, z, t = torch.randn(6, 2), torch.randn(6, 2), torch.rand(6)
    x_t = interpolate(x, z, t)
    y, null = torch.tensor([0, 1, 2, 0, 1, 2]), torch.full((6,), 3)
    v = enhanced_velocity(model, x_t, t, x, z, {"y": y}, {"y": null}, kappa=0.5)
    expected = (z - x) + 0.5 * (model(x_t, t, t, y=y) - model(x_t, t, t, y=null))
    torch.testing.assert_close(v, expected.detach())
    assert torch.equal(enhanced_velocity(model, x_t, t, x, z, {"y": y}, {"y": null}, 0.0), z - x)


def test_conditional_training_with_guidance():
    torch.manual_seed(0)
    model = TinyNet(2, classes=3)
    ema = copy.deepcopy(model).requires_grad_(False)
    for p in ema.parameters():  # an EMA that differs from the model, so the guidance term is not trivial
        p.add_(0.1 * torch.randn_like(p))
    x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
    cond, null_cond = {"y": y}, {"y": torch.full_like(y, 3)}
    # flow with κ: ‖F(x_t, t, t | c) − (z − x + κ·(F⁻(x_t | c) − F⁻(x_t | ∅)))‖², written out by hand
    torch.manual_seed(1)
    loss, _ = training_loss(model, ema, x, method="flow", cond=cond, null_cond=null_cond, kappa=0.5)
    torch.manual_seed(1)
    z, t = torch.randn_like(x), torch.rand(8)
    x_t = t[:, None] * z + (1 - t[:, None]) * x
    target = z - x + 0.5 * (ema(x_t, t, t, **cond) - ema(x_t, t, t, **null_cond))
    torch.testing.assert_close(loss, (model(x_t, t, t, **cond) - target).pow(2).mean())
    for method in ["rcgm", "twinflow"]:  # the same draws with and without κ: only the target moves
        losses = []
        for kappa in (0.5, 0.0):
            torch.manual_seed(2)
            losses.append(training_loss(model, ema, x, method=method, cond=cond, null_cond=null_cond,
                                        kappa=kappa)[0])
        losses[0].backward()
        assert torch.isfinite(losses[0]) and not torch.equal(losses[0], losses[1]), method


def test_adv_weight_scales_only_the_adversarial_term():
    """loss = mean over the batch of per-sample terms + rectify_weight·L_rectify; the adversarial
    part is a quarter of the batch, so adv_weight w adds (w − 1)·L_adv/4 and changes no draw."""
    model, ema = make((16, 2))
    x, results = torch.randn(16, 2), {}
    for weight in (1.0, 0.25, 0.0):
        torch.manual_seed(5)
        results[weight] = training_loss(model, ema, x, method="twinflow", adv_weight=weight)
    (loss_1, logs_1), (loss_q, logs_q), (loss_0, logs_0) = results.values()
    assert torch.equal(logs_1["adv"], logs_q["adv"]) and torch.equal(logs_1["rectify"], logs_0["rectify"])
    torch.testing.assert_close(loss_1 - loss_0, logs_1["adv"] / 4)
    torch.testing.assert_close(loss_q - loss_0, 0.25 * logs_1["adv"] / 4)


def test_plain_one_step_target_is_the_consistency_target_itself():
    """plain=True rows regress on F* (a target that does not depend on F); the clamped target is
    sg(F) − clamp((F − F*)/Δt); both agree on F = F*, and plain leaves every other row alone."""
    model, ema = make((6, 2))
    x_t, v_star = torch.randn(6, 2), torch.randn(6, 2)
    t, tt = torch.tensor([1.0, 1.0, 1.0, 0.7, 0.5, 0.3]), torch.tensor([0.0, 0.0, 0.0, 0.2, 0.5, 0.1])
    plain = torch.tensor([True, True, True, False, False, False])
    F_a, F_b = torch.randn(6, 2), torch.randn(6, 2)
    target = lambda F, mask: base_target(ema, F, x_t, t, tt, v_star, {}, plain=mask)
    F_star = target(F_a, plain)[:3]
    torch.testing.assert_close(target(F_b, plain)[:3], F_star)  # independent of F
    torch.testing.assert_close(target(F_a, plain)[3:], target(F_a, None)[3:])  # other rows untouched
    F_c = F_a.clone()
    F_c[:3] = F_star
    torch.testing.assert_close(target(F_c, None)[:3], F_star)  # the clamped target's fixed point
    assert not torch.allclose(target(F_b, None)[:3], F_star)  # ...which it reaches only at F = F*


def test_target_switches_pick_the_parts_that_regress_on_F_star(monkeypatch):
    """one_step_target / multi_step_target mark exactly the one-step / multi part's rows as plain
    (split=True: 16 rows each, in the order one, multi, any); "clamped" marks none."""
    import common
    masks = []
    real_base_target = common.base_target

    def spy(*args, plain=None, **kwargs):  # records the mask, then computes the real target
        masks.append(plain)
        return real_base_target(*args, plain=plain, **kwargs)

    monkeypatch.setattr(common, "base_target", spy)
    model, ema = make((64, 2))
    for one in ("clamped", "plain"):
        for multi in ("clamped", "plain"):
            training_loss(model, ema, torch.randn(64, 2), method="twinflow", one_step_target=one,
                          multi_step_target=multi)
            expected = torch.tensor([one == "plain"] * 16 + [multi == "plain"] * 16 + [False] * 16)
            assert torch.equal(masks[-1], expected)
    with pytest.raises(ValueError, match="multi_step_target"):
        training_loss(model, ema, torch.randn(8, 2), method="rcgm", multi_step_target="median")


def test_rectify_switches_pick_the_model_and_the_noise_range():
    """rectify_with_ema: Δv's two no-grad calls at ±τ' go to the EMA, not to the live model;
    rectify_max_time bounds τ'; one_step_target is checked."""
    for with_ema in (False, True):
        model, ema = make((64, 2))
        live, frozen = Spy(model), Spy(ema)
        training_loss(live, frozen, torch.randn(64, 2), method="twinflow", rectify_with_ema=with_ema,
                      rectify_max_time=0.5)
        delta_v_calls = [c for c in (frozen if with_ema else live).calls if not c[2] and (c[0] < 0).all()]
        assert len(delta_v_calls) == 1 and delta_v_calls[0][3] == 16  # the fake branch, on the one-step part
        assert (delta_v_calls[0][0] >= -0.5).all()  # τ' ≤ 0.5 (16 draws: by chance, p = 2⁻¹⁶)
        assert not any(not c[2] and (c[0] < 0).all() for c in (live if with_ema else frozen).calls)
    with pytest.raises(ValueError, match="one_step_target"):
        training_loss(model, ema, torch.randn(8, 2), method="rcgm", one_step_target="direct")


class Recorder(nn.Module):
    """Records the inputs and output of every call, and whether it was made with gradient."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x_t, t, tt, **cond):
        F = self.model(x_t, t, tt, **cond)
        self.calls.append((x_t.detach().clone(), t.clone(), tt.clone(), torch.is_grad_enabled(), F.detach().clone()))
        return F


def test_the_adversarial_part_noises_the_fake_samples_with_fresh_noise():
    """Rebuild z' from the adversarial rows, x_τ = τ·z' + (1 − τ)·x_fake, and compare it with the z
    that made x_fake = z − F(z, 1, 0): reusing z would learn a coupled, reflow-like field."""
    model, ema = make((256, 2))
    recorder = Recorder(model)
    training_loss(recorder, ema, torch.randn(256, 2), method="twinflow")
    one_step = [c for c in recorder.calls if not c[3] and (c[1] == 1).all() and (c[2] == 0).all()]
    with_gradient = [c for c in recorder.calls if c[3]]
    assert len(one_step) == 1 and len(with_gradient) == 1
    z, _, _, _, F_fake = one_step[0]
    x_fake = z - F_fake  # the adversarial part's own samples
    x_t, t, _, _, _ = with_gradient[0]  # the one forward pass with gradient
    adversarial = t < 0
    tau = -t[adversarial][:, None]
    z_new = (x_t[adversarial] - (1 - tau) * x_fake) / tau
    assert adversarial.sum() == 64 and abs(z_new.std() - 1) < 0.2  # x_τ is on a line from x_fake to noise
    assert abs(torch.corrcoef(torch.stack([z_new.flatten(), z.flatten()]))[0, 1]) < 0.3


def test_rectify_reads_delta_v_on_the_one_step_parts_own_samples_and_adv_regresses_on_z_prime_minus_x_fake():
    """Δv's two calls sit on the line from x̂ = z − F(z, 1, 0) (the one-step part's own output, in the
    pass with gradient) to fresh noise z'; both branches read the same x_τ'. logs["adv"] is
    ‖F(x_τ, −τ, −τ) − (z' − x_fake)‖², rebuilt from the recorded rows."""
    model, ema = make((256, 2))
    recorder = Recorder(model)
    _, logs = training_loss(recorder, ema, torch.randn(256, 2), method="twinflow")
    (x_t, t, tt, _, F), = [c for c in recorder.calls if c[3]]  # the one pass with gradient
    one = (t == 1) & (tt == 0)
    z, x_hat = x_t[one], x_t[one] - F[one]
    fake_call, real_call = ([c for c in recorder.calls if not c[3] and (c[1] == c[2]).all() and (sign * c[1] > 0).all()]
                            for sign in (-1, 1))
    assert len(fake_call) == len(real_call) == 1 and one.sum() == 64
    (x_tau, minus_tau, _, _, _), (x_tau_real, plus_tau, _, _, _) = fake_call[0], real_call[0]
    assert torch.equal(x_tau, x_tau_real) and torch.equal(minus_tau, -plus_tau)
    tau = plus_tau[:, None]
    z_prime = (x_tau - (1 - tau) * x_hat) / tau
    assert abs(z_prime.std() - 1) < 0.2  # on the line from x̂ to noise
    assert abs(torch.corrcoef(torch.stack([z_prime.flatten(), z.flatten()]))[0, 1]) < 0.3  # fresh noise
    (z_fake, _, _, _, F_fake), = [c for c in recorder.calls if not c[3] and (c[1] == 1).all()]
    x_fake, adversarial = z_fake - F_fake, t < 0
    tau = -t[adversarial][:, None]
    z_prime = (x_t[adversarial] - (1 - tau) * x_fake) / tau
    adv = ((F[adversarial] - (z_prime - x_fake)) ** 2).mean(1).mean()
    assert torch.allclose(logs["adv"], adv, rtol=1e-4)


def test_a_bf16_model_trains_and_samples_on_bf16_data():
    """Without autocast: every network call must get the model's dtype (float32 times promote)."""
    model, ema = make((8, 2), classes=3)
    model, ema = model.to(torch.bfloat16), ema.to(torch.bfloat16)
    x, y = torch.randn(8, 2, dtype=torch.bfloat16), torch.arange(8) % 3
    null = {"y": torch.full((8,), 3)}
    for method in ("flow", "rcgm", "twinflow"):
        for rectify_with_ema in (False, True):
            loss, _ = training_loss(model, ema, x, method=method, cond={"y": y}, null_cond=null, kappa=0.5,
                                    rectify_with_ema=rectify_with_ema)
            loss.backward()
            assert loss.dtype == torch.float32 and torch.isfinite(loss)
    out = sample(model, torch.randn(8, 2, dtype=torch.bfloat16), steps=3, style="mul", order=2, cond={"y": y})
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bf16_autocast_on_cpu():
    model, ema = make((8, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = training_loss(model, ema, torch.randn(8, 2), method="twinflow")
        out = sample(model, torch.randn(8, 2), steps=2)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------
def test_one_step_sample_from_t1_returns_x_hat():
    model, _ = make((8, 2))
    z = torch.randn(8, 2)
    expected = z - model(z, torch.ones(8), torch.zeros(8))
    torch.testing.assert_close(sample(model, z, steps=1), expected.detach())


def test_conditioning_reaches_every_call_even_under_a_name_sample_also_uses():
    """cond is a dict, so a model input named like one of sample's own arguments reaches the model."""
    seen = []

    def model(x_t, t, tt, style=None, order=None):
        seen.append((style, order))
        return torch.zeros_like(x_t)
    style, order = torch.ones(8), torch.zeros(8)
    sample(model, torch.randn(8, 2), steps=3, style="mul", order=2, cond={"style": style, "order": order})
    assert len(seen) == 5 and all(s is style and o is order for s, o in seen)


@pytest.mark.parametrize("steps,order,nfe", [(1, 1, 1), (4, 1, 4), (1, 2, 1), (4, 2, 7)])
def test_number_of_function_evaluations(steps, order, nfe):
    model, _ = make((8, 2))
    spy = Spy(model)
    sample(spy, torch.randn(8, 2), steps=steps, style="mul", order=order)
    assert len(spy.calls) == nfe


def test_each_style_asks_for_its_target_time():
    model, _ = make((8, 2))
    grid = time_grid(4)
    for style, expected_tt in [("few", torch.zeros(4)), ("any", grid[1:]), ("mul", grid[:-1])]:
        spy = Spy(model)
        sample(spy, torch.randn(8, 2), steps=4, style=style)
        torch.testing.assert_close(torch.stack([c[0][0] for c in spy.calls]), grid[:-1])
        torch.testing.assert_close(torch.stack([c[1][0] for c in spy.calls]), expected_tt)


def test_heuns_correction_reads_the_velocity_at_the_next_grid_time():
    model, _ = make((8, 2))
    spy = Spy(model)
    sample(spy, torch.randn(8, 2), steps=3, style="mul", order=2)  # grid 1, 2/3, 1/3, 0
    times = torch.stack([c[0][0] for c in spy.calls])
    torch.testing.assert_close(times, torch.tensor([1, 2 / 3, 2 / 3, 1 / 3, 1 / 3]))
    torch.testing.assert_close(torch.stack([c[1][0] for c in spy.calls]), times)


def test_order_2_is_refused_for_the_jump_styles():
    model, _ = make((8, 2))
    for style in ("few", "any"):
        with pytest.raises(ValueError, match="style='mul'"):
            sample(model, torch.randn(8, 2), steps=4, style=style, order=2)


class LinearField(nn.Module):
    """dx/dt = x, so x(0) = x(1)·e⁻¹ exactly."""

    def forward(self, x_t, t, tt):
        return x_t


def test_order_2_is_more_accurate_than_order_1():
    z = torch.randn(16, 2)
    exact = z * torch.exp(torch.tensor(-1.0))
    error = {order: (sample(LinearField(), z, steps=6, style="mul", order=order) - exact).abs().max()
             for order in (1, 2)}
    assert error[2] < error[1] / 5


class ZeroVelocity(nn.Module):
    def forward(self, x_t, t, tt):
        return torch.zeros_like(x_t)


def test_stochastic_sampling_draws_fresh_noise_at_every_step():
    """With F = 0, x̂ = ẑ = x, so at s = 1 each step is x ← (1 − t_n)·x + t_n·ε: the ε of each
    step can be read back from the trajectory, and the two draws must be independent."""
    z = torch.randn(4096, 2)
    _, (x0, x1, x2, _) = sample(ZeroVelocity(), z, steps=3, stochastic_ratio=1.0, return_trajectory=True)
    noise_1 = (x1 - x0 / 3) * 3 / 2  # grid 1, 2/3, 1/3, 0
    noise_2 = (x2 - 2 * x1 / 3) * 3
    assert abs(noise_1.std() - 1) < 0.05 and abs(noise_2.std() - 1) < 0.05
    assert abs(torch.corrcoef(torch.stack([noise_1.flatten(), noise_2.flatten()]))[0, 1]) < 0.05


def test_a_partial_stochastic_ratio_mixes_noise_at_unit_variance():
    """At s = 0.5 a step re-noises with √(1 − s)·ẑ + √s·ε (not (1 − s)·ẑ + s·ε): with F = 0 the ε of
    the step read back from the trajectory is standard noise, independent of x."""
    torch.manual_seed(0)
    z = torch.randn(4096, 2)
    _, (x0, x1, _) = sample(ZeroVelocity(), z, steps=2, stochastic_ratio=0.5, return_trajectory=True)
    noise = (x1 - 0.5 * x0 - 0.5 * 0.5**0.5 * x0) / (0.5 * 0.5**0.5)  # grid 1, 1/2, 0
    assert abs(noise.std() - 1) < 0.05
    assert abs(torch.corrcoef(torch.stack([noise.flatten(), x0.flatten()]))[0, 1]) < 0.05


def test_stochastic_ratio_and_fake_branch():
    model, _ = make((8, 2))
    spy = Spy(model)
    z = torch.randn(8, 2)
    torch.manual_seed(0)
    a = sample(spy, z, steps=3, stochastic_ratio=1.0)
    torch.manual_seed(1)
    b = sample(model, z, steps=3, stochastic_ratio=1.0)
    assert not torch.allclose(a, b)  # the noise follows the seed (fresh per step: the test above)
    torch.testing.assert_close(sample(model, z, steps=3, stochastic_ratio=0.0),
                               sample(model, z, steps=3, stochastic_ratio=0.0))
    for style in ("few", "any", "mul"):  # the twin trajectory: t < 0 and the target time on its side
        spy.calls.clear()
        _, trajectory = sample(spy, z, steps=3, style=style, fake=True, return_trajectory=True)
        assert all((c[0] < 0).all() and (c[1] <= 0).all() for c in spy.calls) and trajectory.shape == (4, 8, 2)
        assert style == "few" or all((c[1] < 0).all() for c in spy.calls[:-1]), style


def test_time_grid():
    torch.testing.assert_close(time_grid(1), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    torch.testing.assert_close(time_grid(2, gap=(0.001, 0.6)), torch.tensor([0.999, 0.6, 0.0]))
    u = torch.linspace(0, 1, 5)[:4]  # 1 − K(u), K(u) = (1 − (1 − uᵃ)ᵇ)ᶜ
    torch.testing.assert_close(time_grid(4, kumaraswamy=(1.0, 2.0, 1.0)), torch.cat([(1 - u) ** 2, torch.zeros(1)]))
    torch.testing.assert_close(time_grid(4, kumaraswamy=(1.0, 1.0, 2.0)), torch.cat([1 - u**2, torch.zeros(1)]))
    torch.testing.assert_close(time_grid(4, kumaraswamy=(2.0, 1.0, 1.0)), torch.cat([1 - u**2, torch.zeros(1)]))


# ----------------------------------------------------------------------------------------------
# EMA, seeds, long runs
# ----------------------------------------------------------------------------------------------
def test_update_ema():
    model, ema = make((4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = [p.clone() for p in ema.parameters()]
    update_ema(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p)
    update_ema(ema, model, 0.99, step=0)  # the warm-up starts from a copy
    for e, p in zip(ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, p)
    norm = nn.BatchNorm1d(2)
    norm_ema = copy.deepcopy(norm)
    norm(torch.randn(16, 2) + 3)  # training mode: the running statistics move
    update_ema(norm_ema, norm, 0.9)  # buffers are copied, not averaged
    assert torch.equal(norm_ema.running_mean, norm.running_mean) and norm_ema.num_batches_tracked == 1


def short_run(seed, steps, method="twinflow", shape=(16, 2)):
    model, ema = make(shape, seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data, losses = torch.randn(256, *shape[1:]) * 0.5 + 1.0, []
    for step in range(steps):
        x = data[torch.randint(len(data), (shape[0],))]
        loss, _ = training_loss(model, ema, x, method=method)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema(ema, model, 0.99, step)
        losses.append(loss.item())
    return losses, model


def test_a_seed_makes_a_cpu_run_reproducible():
    a, model_a = short_run(seed=3, steps=5)
    b, model_b = short_run(seed=3, steps=5)
    c, _ = short_run(seed=4, steps=5)
    assert a == b and a != c
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("method", ["flow", "rcgm", "twinflow"])
def test_no_nan_over_many_steps(method):
    losses, _ = short_run(seed=0, steps=300, method=method, shape=(8, 3, 2, 2))
    assert all(torch.isfinite(torch.tensor(losses)))
