"""The exercise self-checks are themselves tested: each passes on the reference in common.py, catches
planted wrong answers with the right diagnosis, and the learner stubs stay unsolved."""
import importlib
import os
import re
import sys

import pytest
import torch

import common

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "exercises"))
import checks  # noqa: E402

from common import expand, interpolate, per_sample_mse, predict  # noqa: E402


# ----------------------------------------------------------------------------------------------
# References with the exercises' signatures (built from common.py)
# ----------------------------------------------------------------------------------------------
def reference_adversarial(model, z, x_fake, **cond):
    z_new, tau = torch.randn_like(x_fake), torch.rand(x_fake.shape[0])
    _, _, F = predict(model, interpolate(x_fake, z_new, tau), -tau, -tau, **cond)
    return common.adversarial_loss(F, z_new, x_fake)


def reference_heun(model, z, steps, **cond):
    return common.sample(model, z, steps=steps, style="mul", order=2, cond=cond)


REFERENCES = {
    "interpolate": (checks.check_interpolate, common.interpolate),
    "predict": (checks.check_predict, common.predict),
    "adversarial": (checks.check_adversarial_loss, reference_adversarial),
    "rectify": (checks.check_rectify_loss, common.rectify_loss),
    "base_target": (checks.check_base_target, common.base_target),
    "heun": (checks.check_sample_heun, reference_heun),
    "enhanced": (checks.check_enhanced_velocity, common.enhanced_velocity),
}


@pytest.mark.parametrize("name", REFERENCES)
def test_every_checker_passes_on_the_reference(name):
    check, reference = REFERENCES[name]
    check(reference)


def test_the_rectify_checker_accepts_both_branches_in_one_call():
    checks.check_rectify_loss(batched_rectify)


def test_the_rectify_checker_reads_the_clamp_argument():
    checks.check_rectify_loss(common.rectify_loss, clamp=0.5)
    with pytest.raises(AssertionError, match="clamp"):
        checks.check_rectify_loss(rectify_with(hard_clamp=True), clamp=0.5)  # a hard-coded ±1


def test_the_enhanced_checker_accepts_both_calls_in_one_batch():
    checks.check_enhanced_velocity(batched_enhanced)


# ----------------------------------------------------------------------------------------------
# Planted wrong answers, each with the diagnosis the learner should read
# ----------------------------------------------------------------------------------------------
def swapped_interpolate(x, z, t):
    a = expand(t.abs(), x)
    return a * x + (1 - a) * z


def signed_interpolate(x, z, t):
    a = expand(t, x)
    return a * z + (1 - a) * x


def unbroadcast_interpolate(x, z, t):
    return t[:, None] * z + (1 - t[:, None]) * x


def plus_predict(model, x_t, t, tt, **cond):
    F = model(x_t, t, tt, **cond).float()
    return x_t + expand(t.abs(), F) * F, x_t + (1 - expand(t.abs(), F)) * F, F


def signed_predict(model, x_t, t, tt, **cond):
    F = model(x_t, t, tt, **cond).float()
    return x_t - expand(t, F) * F, x_t + (1 - expand(t, F)) * F, F


def bf16_predict(model, x_t, t, tt, **cond):
    F = model(x_t, t, tt, **cond)
    return x_t - expand(t.abs(), F) * F, x_t + (1 - expand(t.abs(), F)) * F, F


def positive_time_adversarial(model, z, x_fake, **cond):
    z_new, tau = torch.randn_like(x_fake), torch.rand(x_fake.shape[0])
    _, _, F = predict(model, interpolate(x_fake, z_new, tau), tau, tau, **cond)
    return per_sample_mse(F, z_new - x_fake)


def reused_noise_adversarial(model, z, x_fake, **cond):
    tau = torch.rand(x_fake.shape[0])
    _, _, F = predict(model, interpolate(x_fake, z, tau), -tau, -tau, **cond)
    return per_sample_mse(F, z - x_fake)


def flipped_target_adversarial(model, z, x_fake, **cond):
    z_new, tau = torch.randn_like(x_fake), torch.rand(x_fake.shape[0])
    _, _, F = predict(model, interpolate(x_fake, z_new, tau), -tau, -tau, **cond)
    return per_sample_mse(F, x_fake - z_new)


def fixed_tau_adversarial(model, z, x_fake, **cond):
    z_new, tau = torch.randn_like(x_fake), torch.full((x_fake.shape[0],), 0.5)
    _, _, F = predict(model, interpolate(x_fake, z_new, tau), -tau, -tau, **cond)
    return per_sample_mse(F, z_new - x_fake)


def unnoised_adversarial(model, z, x_fake, **cond):
    z_new, tau = torch.randn_like(x_fake), torch.rand(x_fake.shape[0])
    _, _, F = predict(model, x_fake, -tau, -tau, **cond)
    return per_sample_mse(F, z_new - x_fake)


def mixed_sign_adversarial(model, z, x_fake, **cond):
    """Half the rows at +τ: the real branch would learn the model's own samples as data."""
    z_new, tau = torch.randn_like(x_fake), torch.rand(x_fake.shape[0])
    signed = torch.where(torch.arange(len(tau)) % 2 == 0, -tau, tau)
    _, _, F = predict(model, interpolate(x_fake, z_new, tau), signed, signed, **cond)
    return per_sample_mse(F, z_new - x_fake)


def narrow_noise_adversarial(model, z, x_fake, **cond):
    z_new, tau = 0.5 * torch.randn_like(x_fake), torch.rand(x_fake.shape[0])
    _, _, F = predict(model, interpolate(x_fake, z_new, tau), -tau, -tau, **cond)
    return per_sample_mse(F, z_new - x_fake)


def no_grad_adversarial(model, z, x_fake, **cond):
    with torch.no_grad():
        return reference_adversarial(model, z, x_fake, **cond)


def batched_rectify(model, F_one_step, x_fake, cond, clamp=1.0):
    """A right answer in another form: both branches in ONE call, on [x_τ', x_τ'] at [−τ', τ']."""
    with torch.no_grad():
        z, tau = torch.randn_like(x_fake), torch.rand(x_fake.shape[0])
        x_tau = interpolate(x_fake, z, tau)
        times = torch.cat([-tau, tau])
        both = {k: torch.cat([v, v]) for k, v in cond.items()}  # each row keeps its own conditioning
        fake, real = model(torch.cat([x_tau, x_tau]), times, times, **both).chunk(2)
        delta_v = (fake - real).clamp(-clamp, clamp)
    return per_sample_mse(F_one_step, (F_one_step - delta_v).detach())


def rectify_with(flip=False, detach_target=True, clamp_it=True, same_sign=False, noised=True, tt_zero=False,
                 fixed_tau=False, hard_clamp=False, drop_cond=False, delta_v_grad=False):
    def rectify_loss(model, F_one_step, x_fake, cond, clamp=1.0):
        clamp = 1.0 if hard_clamp else clamp
        cond = {} if drop_cond else cond
        with torch.enable_grad() if delta_v_grad else torch.no_grad():
            z, tau = torch.randn_like(x_fake), torch.rand(x_fake.shape[0])
            tau = torch.full_like(tau, 1e-3) if fixed_tau else tau
            x_tau = interpolate(x_fake, z, tau) if noised else x_fake
            target_time = torch.zeros_like(tau) if tt_zero else tau
            fake = model(x_tau, tau if same_sign else -tau, target_time if same_sign else -target_time, **cond)
            real = model(x_tau, tau, target_time, **cond)
            delta_v = (real - fake) if flip else (fake - real)
            delta_v = delta_v.clamp(-clamp, clamp) if clamp_it else delta_v
        if delta_v_grad:  # F_one_step detached, Δv not: the model's weights get L_rectify's gradient
            return per_sample_mse(F_one_step, F_one_step.detach() - delta_v)
        target = F_one_step - delta_v
        return per_sample_mse(F_one_step, target.detach() if detach_target else target)
    return rectify_loss


def unguarded_base_target(ema_model, F, x_t, t, tt, v_star, cond, order=2):
    """No flow-matching branch, and F* = (Δt·v* + P)/(t − tt) for every sample."""
    with torch.no_grad():
        a, b = expand(t, F), expand(tt, F)
        t_m = torch.maximum(t - common.DT, tt)
        x, P = x_t - common.DT * v_star, torch.zeros_like(F)
        for i in range(order):
            t_c, t_n = t_m + (tt - t_m) * (i / order), t_m + (tt - t_m) * ((i + 1) / order)
            _, _, F_ema = predict(ema_model, x, t_c, t_n, **cond)
            x, P = x - expand(t_c - t_n, x) * F_ema, P + expand(t_c - t_n, x) * F_ema
        F_star = (common.DT * v_star + P) / (a - b)  # divides by t − tt: inf·0 where t = tt
        return F - ((a - b) / common.DT * (F - F_star)).clamp(-1, 1)


def unclamped_base_target(ema_model, F, x_t, t, tt, v_star, cond, order=2):
    target = common.base_target(ema_model, F, x_t, t, tt, v_star, cond, order)
    far = expand((t - tt) >= common.DT, F)
    return torch.where(far, F + 3 * (target - F), target)  # a residual outside [−1, 1]


def one_substep_base_target(ema_model, F, x_t, t, tt, v_star, cond, order=2):
    return common.base_target(ema_model, F, x_t, t, tt, v_star, cond, order=1)


def grad_base_target(ema_model, F, x_t, t, tt, v_star, cond, order=2):
    return common.base_target.__wrapped__(ema_model, F, x_t, t, tt, v_star, cond, order)


def heun_with(correct_last=False, correct=True):
    def sample_heun(model, z, steps, **cond):
        x, grid = z.clone(), torch.linspace(1, 0, steps + 1)
        for i in range(steps):
            t_c, t_n = grid[i].expand(len(z)), grid[i + 1].expand(len(z))
            F = model(x, t_c, t_c, **cond)
            if correct and (correct_last or i < steps - 1):
                x_euler = x + expand(t_n - t_c, x) * F
                F = (F + model(x_euler, t_n, t_n, **cond)) / 2
            x = x + expand(t_n - t_c, x) * F
        return x
    return sample_heun


def flipped_enhanced(ema_model, x_t, t, x, z, cond, null_cond, kappa):
    return 2 * (z - x) - common.enhanced_velocity(ema_model, x_t, t, x, z, cond, null_cond, kappa)


def shuffled_enhanced(ema_model, x_t, t, x, z, cond, null_cond, kappa):
    shuffled = {"y": cond["y"][torch.randperm(len(cond["y"]))]}
    return common.enhanced_velocity(ema_model, x_t, t, x, z, cond, shuffled, kappa)


def batched_enhanced(ema_model, x_t, t, x, z, cond, null_cond, kappa):
    """A right answer in another form: the conditional and null calls in ONE batch (as in CFG code)."""
    with torch.no_grad():
        both = ema_model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]),
                         y=torch.cat([cond["y"], null_cond["y"]]))
        conditional, unconditional = both.chunk(2)
        return (z - x) + kappa * (conditional - unconditional)


def half_kappa_enhanced(ema_model, x_t, t, x, z, cond, null_cond, kappa):
    return common.enhanced_velocity(ema_model, x_t, t, x, z, cond, null_cond, kappa / 2)


def jump_enhanced(ema_model, x_t, t, x, z, cond, null_cond, kappa):
    """Guidance read from the jump to the data (tt = 0), not from the instantaneous velocity."""
    with torch.no_grad():
        zero = torch.zeros_like(t)
        return (z - x) + kappa * (ema_model(x_t, t, zero, **cond) - ema_model(x_t, t, zero, **null_cond))


def grad_enhanced(ema_model, x_t, t, x, z, cond, null_cond, kappa):
    return common.enhanced_velocity.__wrapped__(ema_model, x_t, t, x, z, cond, null_cond, kappa)


PLANTED = [
    ("interpolate", swapped_interpolate, "swapped ends"),
    ("interpolate", signed_interpolate, "negative time"),
    ("interpolate", unbroadcast_interpolate, "crashed on inputs of shapes"),
    ("predict", plus_predict, "sign"),
    ("predict", signed_predict, "time branch"),
    ("predict", bf16_predict, "dtype"),
    ("adversarial", positive_time_adversarial, "NEGATIVE time"),
    ("adversarial", reused_noise_adversarial, "you reused z"),
    ("adversarial", flipped_target_adversarial, "target sign"),
    ("adversarial", fixed_tau_adversarial, "not one fixed τ"),
    ("adversarial", unnoised_adversarial, "x_τ is not τ·z'"),
    ("adversarial", mixed_sign_adversarial, "NEGATIVE time"),
    ("adversarial", narrow_noise_adversarial, "x_τ is not τ·z'"),
    ("adversarial", no_grad_adversarial, "no gradient reaches the model"),
    ("rectify", rectify_with(flip=True), "AWAY from the real data"),
    ("rectify", rectify_with(detach_target=False), "no gradient reaches F_one_step"),
    ("rectify", rectify_with(clamp_it=False), "clamp"),
    ("rectify", rectify_with(same_sign=True), "time branches"),
    ("rectify", rectify_with(noised=False), "noise the one-step samples first"),
    ("rectify", rectify_with(tt_zero=True), "tt = t"),
    ("rectify", rectify_with(fixed_tau=True), "not one fixed τ'"),
    ("rectify", rectify_with(drop_cond=True), "pass the conditioning"),
    ("rectify", rectify_with(delta_v_grad=True), "missing stop-gradient"),
    ("base_target", unguarded_base_target, "inf/NaN"),
    ("base_target", unclamped_base_target, "clamp"),
    ("base_target", one_substep_base_target, "order"),
    ("base_target", grad_base_target, "build it under torch.no_grad"),
    ("heun", heun_with(correct=False), "that is Euler"),
    ("heun", heun_with(correct_last=True), "the last step"),
    ("enhanced", flipped_enhanced, "sign"),
    ("enhanced", shuffled_enhanced, "use null_cond"),
    ("enhanced", grad_enhanced, "under torch.no_grad"),
    ("enhanced", half_kappa_enhanced, "κ·(F⁻(x_t, t, t | cond)"),
    ("enhanced", jump_enhanced, "κ·(F⁻(x_t, t, t | cond)"),
]


@pytest.mark.parametrize("name, wrong, diagnosis", PLANTED, ids=[f"{p[0]}-{p[1].__qualname__}" for p in PLANTED])
def test_every_checker_catches_its_planted_wrong_answers(name, wrong, diagnosis):
    check, _ = REFERENCES[name]
    with pytest.raises(AssertionError, match=re.escape(diagnosis)):  # the diagnosis as written
        check(wrong)


def test_every_coding_exercise_is_covered_by_planted_answers():
    assert {p[0] for p in PLANTED} == set(REFERENCES)


STUBS = [("ex1_interpolate", "interpolate", "interpolate"), ("ex2_adversarial", "adversarial_loss", "adversarial"),
         ("ex3_rectify", "rectify_loss", "rectify"), ("ex4_base_target", "base_target", "base_target"),
         ("ex5_heun", "sample_heun", "heun"), ("ex6_enhanced", "enhanced_velocity", "enhanced")]


@pytest.mark.parametrize("module, function, name", STUBS)
def test_learner_stubs_stay_unsolved(module, function, name):
    """The shipped files are TODOs; the checkers report them as such, not as a crash."""
    with pytest.raises(AssertionError, match="not solved yet"):
        REFERENCES[name][0](getattr(importlib.import_module(module), function))


def test_the_learners_test_file_checks_each_exercise_function(monkeypatch):
    """exercises/test_exercises.py, the file learners run: with every exercise solved (the references)
    all its tests pass, and a wrong answer in one exercise's function fails that exercise's test."""
    learner = importlib.import_module("test_exercises")
    solved = [("ex1_interpolate", "interpolate", common.interpolate),
              ("ex1_interpolate", "predict", common.predict),
              ("ex2_adversarial", "adversarial_loss", reference_adversarial),
              ("ex3_rectify", "rectify_loss", common.rectify_loss),
              ("ex4_base_target", "base_target", common.base_target),
              ("ex5_heun", "sample_heun", reference_heun),
              ("ex6_enhanced", "enhanced_velocity", common.enhanced_velocity)]
    for module, function, reference in solved:
        monkeypatch.setattr(importlib.import_module(module), function, reference)
    tests = {name: getattr(learner, name) for name in dir(learner) if name.startswith("test_")}
    for test in tests.values():
        test()
    wrong = {"test_interpolate": ("ex1_interpolate", "interpolate", swapped_interpolate),
             "test_predict": ("ex1_interpolate", "predict", plus_predict),
             "test_adversarial": ("ex2_adversarial", "adversarial_loss", positive_time_adversarial),
             "test_rectify": ("ex3_rectify", "rectify_loss", rectify_with(hard_clamp=True)),  # right at clamp 1 only
             "test_base_target": ("ex4_base_target", "base_target", one_substep_base_target),
             "test_heun": ("ex5_heun", "sample_heun", heun_with(correct=False)),
             "test_enhanced": ("ex6_enhanced", "enhanced_velocity", flipped_enhanced)}
    assert set(wrong) == set(tests)
    for name, (module, function, answer) in wrong.items():
        with monkeypatch.context() as patch:
            patch.setattr(importlib.import_module(module), function, answer)
            with pytest.raises(AssertionError):
                tests[name]()
