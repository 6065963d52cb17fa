"""benchmarks/toy_rectify.py: its exact Δv, its copy of the one-step consistency target, and a run."""
import importlib.util
import os

import torch

import common
import toy_2d

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("toy_rectify", os.path.join(HERE, "..", "benchmarks", "toy_rectify.py"))
toy_rectify = importlib.util.module_from_spec(spec)
spec.loader.exec_module(toy_rectify)


def test_exact_delta_v_is_zero_for_equal_banks_and_points_to_the_real_bank():
    torch.manual_seed(0)
    bank, x_tau, tau = torch.randn(256, 2), torch.randn(64, 2), torch.rand(64).clamp_min(0.05)
    assert toy_rectify.exact_delta_v(bank, bank, x_tau, tau).abs().max() < 1e-6
    # Real data at +1, the fake samples at −1: at small τ the one-step sample should move towards +1.
    real, fake = torch.full((8, 2), 1.0), torch.full((8, 2), -1.0)
    x_tau, tau = torch.full((4, 2), -0.2), torch.full((4,), 0.3)
    assert (toy_rectify.exact_delta_v(real, fake, x_tau, tau) > 0).all()
    # Far from both at tiny τ the posterior picks the nearest bank point.
    near = toy_rectify.posterior_mean(torch.tensor([[0.0, 0.0], [3.0, 3.0]]), torch.tensor([[2.9, 2.9]]),
                                      torch.tensor([0.01]))
    assert torch.allclose(near, torch.tensor([[3.0, 3.0]]))


def test_direct_one_step_target_is_the_point_base_target_is_consistent_with():
    """The benchmark rebuilds F* for the one-step part; common.base_target must agree: within the
    clamp its target is F − (F − F*)/Δt, so F = F* + e·Δt/2 gives the target F − e/2."""
    torch.manual_seed(0)
    ema, B = toy_2d.MLP(32).requires_grad_(False), 12
    x_t, v_star = torch.randn(B, 2), torch.randn(B, 2)
    t, tt = torch.cat([torch.ones(4), torch.rand(8)]), torch.cat([torch.zeros(4), torch.rand(8) * 0.5])
    F = torch.randn(B, 2)
    stats = {}
    with toy_rectify.patched("rcgm+direct", torch.randn(100, 2), ema, None, stats):
        direct = common.base_target(ema, F, x_t, t, tt, v_star, {})
    assert common.base_target.__name__ == "base_target" and "unclamped" in stats  # swapped back on exit
    F_star, e = direct[:4], torch.randn(4, 2).clamp(-1, 1)
    F_near = F.clone()
    F_near[:4] = F_star + e * common.DT / 2
    original = common.base_target(ema, F_near, x_t, t, tt, v_star, {})
    assert torch.allclose(original[:4], F_near[:4] - e / 2, atol=1e-4)
    assert torch.equal(direct[4:], common.base_target(ema, F, x_t, t, tt, v_star, {})[4:])  # other parts untouched


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
    assert (common.base_target.__name__, common.rectify_loss.__name__) == ("base_target", "rectify_loss")
