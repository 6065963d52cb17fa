"""benchmarks/toy_rectify.py: its exact Δv, its copy of the one-step consistency target, and a run."""
import importlib.util
import json
import os

import pytest
import torch

import common
import toy_2d
from exact_fields import ShiftedSamples

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("toy_rectify", os.path.join(HERE, "..", "benchmarks", "toy_rectify.py"))
toy_rectify = importlib.util.module_from_spec(spec)
spec.loader.exec_module(toy_rectify)


def test_bank_posterior_mean_matches_the_gaussian_closed_form_and_equal_banks_give_zero():
    torch.manual_seed(0)
    scale, tau = 0.7, torch.tensor([0.2, 0.5, 0.8])
    bank = scale * torch.randn(200_000, 2)
    x_tau = torch.tensor([[0.5, -0.3], [1.0, 0.2], [-0.4, 0.9]])
    # x ~ N(0, s²), x_τ = τ·z + (1 − τ)·x  →  E[x | x_τ] = (1 − τ)s² / ((1 − τ)²s² + τ²) · x_τ
    gain = (1 - tau) * scale**2 / ((1 - tau) ** 2 * scale**2 + tau**2)
    assert torch.allclose(toy_rectify.posterior_mean(bank, x_tau, tau), gain[:, None] * x_tau, atol=0.02)
    small, x_tau, tau = torch.randn(256, 2), torch.randn(64, 2), torch.rand(64).clamp_min(0.05)
    assert toy_rectify.exact_delta_v(small, small, x_tau, tau).abs().max() < 1e-6
    # Two Gaussians with different means: Δv = (E_real[x | x_τ] − E_fake[x | x_τ])/τ, a velocity
    shift = torch.tensor([1.0, 0.0])
    real_bank, fake_bank = bank, bank + shift
    x_tau, tau = torch.tensor([[0.5, -0.3], [1.0, 0.2], [-0.4, 0.9]]), torch.tensor([0.2, 0.5, 0.8])
    posterior = lambda mean: mean + gain[:, None] * (x_tau - (1 - tau)[:, None] * mean)  # of N(mean, s²)
    expected = (posterior(torch.zeros(2)) - posterior(shift)) / tau[:, None]
    assert torch.allclose(toy_rectify.exact_delta_v(real_bank, fake_bank, x_tau, tau), expected, atol=0.05)


def test_delta_v_comes_from_the_model_the_variant_names():
    torch.manual_seed(0)
    model, ema = toy_2d.MLP(16), toy_2d.MLP(16).requires_grad_(False)
    F_one, x_fake = torch.randn(8, 2, requires_grad=True), torch.randn(8, 2)
    original = common.rectify_loss
    expected = {}
    for name, net in (("ema", ema), ("model", model)):
        torch.manual_seed(1)
        expected[name] = original(net, F_one, x_fake, {})
    for variant, source in (("twinflow", "model"), ("twinflow+direct", "ema"), ("twinflow+direct+live", "model")):
        with toy_rectify.patched(variant, torch.randn(100, 2), ema, None, {}):
            torch.manual_seed(1)
            assert torch.equal(common.rectify_loss(model, F_one, x_fake, {}), expected[source]), variant
    assert common.rectify_loss is original


def test_the_oracle_pulls_the_one_step_samples_toward_the_data():
    """twinflow+oracle: Δv from a bank of the data (far to the right) and one of the model's own
    samples (F = 0: the noise, around the origin), so a descent step moves x̂ = z − F right: the
    gradient on F points right (∇_F L = 2·Δv / D)."""
    torch.manual_seed(0)
    model = toy_2d.MLP(16)
    with torch.no_grad():
        model.net[-1].bias.zero_(), model.net[-1].weight.zero_()
    args = toy_rectify.parser.parse_args(["--bank", "256"])
    data = torch.tensor([3.0, 0.0]) + 0.1 * torch.randn(1000, 2)
    F_one = torch.zeros(64, 2, requires_grad=True)
    with toy_rectify.patched("twinflow+oracle", data, model, args, {}):
        common.rectify_loss(model, F_one, 0.2 * torch.randn(64, 2), {}).sum().backward()
    assert (F_one.grad[:, 0] > 0).float().mean() > 0.9


def test_each_variant_trains_with_its_batch_and_weights(monkeypatch):
    seen, real, current = {}, common.training_loss, []

    def spy(model, ema, x, method, **kwargs):
        seen.setdefault(current[-1], set()).add((len(x), method, kwargs["rectify_weight"], kwargs["adv_weight"]))
        return real(model, ema, x, method=method, **kwargs)
    monkeypatch.setattr(common, "training_loss", spy)
    args = toy_rectify.parser.parse_args(["--train-steps", "2", "--batch", "16", "--width", "8", "--bank", "8"])
    for variant in toy_rectify.VARIANTS:
        current.append(variant)
        toy_rectify.train(variant, torch.randn(100, 2), args)
    assert seen["rcgm+3/4-batch"] == {(12, "rcgm", 0.5, 1.0)}  # common.py's defaults: 0.5 and 1
    assert seen["twinflow+no-rectify"] == {(16, "twinflow", 0.0, 1.0)}
    assert seen["twinflow+adv-0.25"] == seen["twinflow+direct+adv-0.25"] == {(16, "twinflow", 0.5, 0.25)}
    for variant in set(toy_rectify.VARIANTS) - {"rcgm+3/4-batch", "twinflow+no-rectify", "twinflow+adv-0.25",
                                                  "twinflow+direct+adv-0.25"}:
        assert seen[variant] == {(16, variant.split("+")[0], 0.5, 1.0)}, variant


def test_delta_v_agreement_of_an_exact_model():
    """Each branch exact and the samples off the data: the learned Δv is the bank's wherever the
    20,000-point banks are precise (τ ≥ 0.3), in size and in direction."""
    torch.manual_seed(0)
    rows = toy_rectify.delta_v_agreement(ShiftedSamples(), torch.randn(20_000, 2), n=500)
    for band in ("tau 0.3-0.6", "tau 0.6-1.0"):
        r = rows[band]
        assert r["cosine"] > 0.95 and r["|exact|"] > 0.5 and r["|error|"] < 0.1 * r["|learned|"], band


def test_the_share_within_the_clamp_is_counted_on_the_one_step_part():
    """|F − F*| < Δt on the one-step rows, per coordinate: 3 of 8 coordinates within (a whole-row
    count would say 1 of 4 rows, an any-coordinate count 2 of 4)."""
    torch.manual_seed(0)
    ema, B = toy_2d.MLP(32).requires_grad_(False), 8
    x_t, v_star = torch.randn(B, 2), torch.randn(B, 2)
    t, tt = torch.cat([torch.ones(4), torch.rand(4)]), torch.cat([torch.zeros(4), torch.rand(4) * 0.5])
    stats = {}
    with toy_rectify.patched("rcgm+direct", torch.randn(100, 2), ema, None, stats):
        F_star = common.base_target(ema, torch.randn(B, 2), x_t, t, tt, v_star, {})[:4]
        F = torch.randn(B, 2)
        F[:4] = F_star + common.DT * torch.tensor([[0.5, -0.5], [0.5, 3.0], [3.0, -3.0], [-3.0, 3.0]])
        common.base_target(ema, F, x_t, t, tt, v_star, {})
    assert stats["unclamped"] == 0.375


def test_direct_one_step_target_is_the_point_base_target_is_consistent_with():
    """The benchmark rebuilds F* for the one-step part; common.base_target must agree: within the
    clamp its target is F − (F − F*)/Δt, so F = F* + e·Δt/2 gives the target F − e/2."""
    torch.manual_seed(0)
    ema, B = toy_2d.MLP(32).requires_grad_(False), 12
    x_t, v_star = torch.randn(B, 2), torch.randn(B, 2)
    t, tt = torch.cat([torch.ones(4), torch.rand(8)]), torch.cat([torch.zeros(4), torch.rand(8) * 0.5])
    F = torch.randn(B, 2)
    stats, original_fn = {}, common.base_target
    with toy_rectify.patched("rcgm", torch.randn(100, 2), ema, None, stats):
        assert torch.equal(common.base_target(ema, F, x_t, t, tt, v_star, {}), original_fn(ema, F, x_t, t, tt, v_star, {}))
    with toy_rectify.patched("rcgm+direct", torch.randn(100, 2), ema, None, stats):
        direct = common.base_target(ema, F, x_t, t, tt, v_star, {})
    assert common.base_target is original_fn and 0 <= stats["unclamped"] <= 1  # swapped back on exit
    F_star, e = direct[:4], torch.randn(4, 2).clamp(-1, 1)
    F_near = F.clone()
    F_near[:4] = F_star + e * common.DT / 2
    original = common.base_target(ema, F_near, x_t, t, tt, v_star, {})
    assert torch.allclose(original[:4], F_near[:4] - e / 2, atol=1e-4)
    assert torch.equal(direct[4:], common.base_target(ema, F, x_t, t, tt, v_star, {})[4:])  # other parts untouched
    plain = common.base_target(ema, F, x_t, t, tt, v_star, {}, plain=torch.arange(B) < 4)
    torch.testing.assert_close(plain, direct)  # common.py's one_step_target="plain" is the same target


def test_benchmark_runs_every_variant(tmp_path):
    out = tmp_path / "rectify.json"
    results = toy_rectify.main(["--train-steps", "6", "--batch", "16", "--width", "16", "--bank", "32",
                                "--num-eval", "300", "--out", str(out)])
    assert set(results["variants"]) == set(toy_rectify.VARIANTS) and out.exists()
    for variant, row in results["variants"].items():
        assert all(0 <= row[k] < 10 for k in ("nfe1", "nfe4", "nfe100")), variant  # finite
        assert 0 <= row["unclamped_share"] <= 1
    bands = results["variants"]["twinflow"]["delta_v_agreement"]
    assert len(bands) == 4 and all(-1 <= r["cosine"] <= 1 for r in bands.values())
    assert (common.base_target.__name__, common.rectify_loss.__name__) == ("base_target", "rectify_loss")  # restored


def test_bad_flags_are_refused_before_training_and_finished_variants_survive_a_failure(tmp_path, monkeypatch):
    for flags in (["--batch", "5"], ["--bank", "0"]):  # a 3-row rcgm+3/4-batch part; an empty bank (Δv = 0)
        with pytest.raises(SystemExit):
            toy_rectify.main(flags + ["--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()
    trained = []
    original = toy_rectify.train

    def second_variant_fails(variant, data, args):
        trained.append(variant)
        if len(trained) == 2:
            raise SystemExit(f"error: {variant}: loss is nan at step 3")
        return original(variant, data, args)

    monkeypatch.setattr(toy_rectify, "train", second_variant_fails)
    out = tmp_path / "rectify.json"
    with pytest.raises(SystemExit, match="loss is nan"):
        toy_rectify.main(["--variants", "rcgm,twinflow", "--train-steps", "4", "--batch", "16", "--width", "16",
                          "--num-eval", "200", "--out", str(out)])
    assert list(json.loads(out.read_text())["variants"]) == ["rcgm"]  # written after the first variant


def test_two_networks_send_each_branch_to_its_own_network():
    torch.manual_seed(0)
    nets = toy_rectify.TwoNetworks(16)
    x_t, t = torch.randn(6, 2), torch.tensor([0.5, -0.5, 1.0, -1.0, 0.2, -0.9])
    F = nets(x_t, t, t)
    real, fake = t > 0, t < 0
    assert torch.allclose(F[real], nets.real(x_t[real], t[real], t[real]))
    assert torch.allclose(F[fake], nets.fake(x_t[fake], t[fake], t[fake]))
    F[fake].sum().backward()  # a loss on the fake branch alone trains only the fake network
    assert all(p.grad is None or not p.grad.any() for p in nets.real.parameters())
    assert any(p.grad is not None and p.grad.any() for p in nets.fake.parameters())
    torch.manual_seed(3)
    single = toy_2d.MLP(16)
    torch.manual_seed(3)
    real = toy_rectify.TwoNetworks(16).real  # the seed gives .real the single MLP's init
    assert all(torch.equal(a, b) for a, b in zip(single.state_dict().values(), real.state_dict().values()))


def test_no_rectify_control_differs_from_twinflow_only_in_the_gradient():
    """twinflow and twinflow+no-rectify draw the same random numbers, so their gap is L_rectify's."""
    args = toy_rectify.parser.parse_args(["--train-steps", "3", "--batch", "16", "--width", "16"])
    data, states, models = torch.randn(200, 2), [], []
    for variant in ("twinflow", "twinflow+no-rectify"):
        models.append(toy_rectify.train(variant, data, args)[0])
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])
    assert not torch.equal(models[0].net[0].weight, models[1].net[0].weight)  # the gradients did differ
