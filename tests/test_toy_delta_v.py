"""benchmarks/toy_delta_v.py: its learned run is toy_2d.py's, its bank Δv points at the data, and a run."""
import importlib.util
import json
import os

import pytest
import torch

import common
import toy_2d
from exact_fields import ExactForGaussianData, ShiftedSamples

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("toy_delta_v", os.path.join(HERE, "..", "benchmarks", "toy_delta_v.py"))
toy_delta_v = importlib.util.module_from_spec(spec)
spec.loader.exec_module(toy_delta_v)

TINY = ["--train-steps", "8", "--width", "16", "--num-eval", "300", "--device", "cpu"]


def test_the_learned_run_is_toy_2d_and_the_bank_run_is_not(tmp_path, capsys):
    results = toy_delta_v.main(TINY + ["--bank", "32", "--table-bank", "400", "--table-points", "50",
                                       "--out", str(tmp_path / "dv")])
    printed = [line.split() for line in capsys.readouterr().out.splitlines()
               if line.strip().startswith(("learned:", "bank:"))]
    for row in printed:  # "learned: 1 NFE a   4 NFE b   100 NFE c"
        swd = results["swd"][row[0].rstrip(":")]
        assert row[1:] == ["1", "NFE", f"{swd['nfe1']:.4f}", "4", "NFE", f"{swd['nfe4']:.4f}",
                           "100", "NFE", f"{swd['nfe100']:.4f}"]
    assert len(printed) == 2
    alone = toy_2d.main(TINY + ["--methods", "twinflow", "--out", str(tmp_path / "alone")])
    for key in ("nfe1", "nfe4", "nfe100"):
        assert results["swd"]["learned"][key] == alone["twinflow"][key], key
    assert results["swd"]["bank"]["nfe1"] != results["swd"]["learned"]["nfe1"]  # L_rectify's Δv did change
    assert (toy_2d.train.__name__, common.rectify_loss.__name__) == ("train", "rectify_loss")  # restored
    assert len(results["branches"]) == len(toy_delta_v.BANDS)
    may_be_empty = {"real_error_off_data", "bank_noise_off_data", "real_error_on_data"}  # no sample on that side
    for row in results["branches"].values():
        assert all(v is None and key in may_be_empty or v is not None and torch.isfinite(torch.tensor(v))
                   for key, v in row.items()) and -1 <= row["cosine"] <= 1
    assert json.loads((tmp_path / "dv" / "delta_v.json").read_text())["swd"] == results["swd"]


def test_a_bank_run_alone_and_a_bad_runs_flag(tmp_path):
    results = toy_delta_v.main(TINY + ["--bank", "32", "--runs", "bank", "--exact", "real",
                                       "--out", str(tmp_path / "bank")])
    assert list(results["swd"]) == ["bank"] and "branches" not in results and results["exact"] == "real"
    assert json.loads((tmp_path / "bank" / "delta_v.json").read_text())["swd"] == results["swd"]
    with pytest.raises(SystemExit, match="--runs bank,oops"):
        toy_delta_v.main(TINY + ["--runs", "bank,oops", "--out", str(tmp_path / "oops")])
    for flag in ("--bank", "--table-bank", "--table-points"):  # an empty bank: Δv = 0 or the learned run again
        with pytest.raises(SystemExit):
            toy_delta_v.main(TINY + [flag, "0", "--out", str(tmp_path / "empty")])
    assert not (tmp_path / "empty").exists()  # refused before any training


@pytest.mark.parametrize("exact", ["both", "real", "fake"])
def test_bank_delta_v_moves_the_one_step_samples_toward_the_data(exact):
    """A descent step on L_rectify moves x̂ = z − F along +Δv: with the data far to the right of
    the model's samples, the gradient on F must point right as well (∇_F L = 2·Δv / D), as long as
    the real branch comes from the bank. With exact="fake" it comes from a model that has never seen
    the data, and there is no pull."""
    torch.manual_seed(0)
    run = toy_delta_v.run_of_toy_2d(bank=256, exact=exact)
    run.data = torch.tensor([3.0, 0.0]) + 0.1 * torch.randn(1000, 2)
    model = toy_2d.MLP(16)
    with torch.no_grad():  # F = 0: the one-step samples are the noise itself, x̂ = z ~ N(0, I), around the origin
        model.net[-1].bias.zero_(), model.net[-1].weight.zero_()
    z = 0.2 * torch.randn(64, 2)
    F_one = torch.zeros(64, 2, requires_grad=True)
    run._bank_rectify_loss(model, F_one, (z - F_one).detach(), {}, max_time=0.5).sum().backward()
    rightward = (F_one.grad[:, 0] > 0).float().mean()
    if exact == "fake":
        assert rightward < 0.8 and F_one.grad[:, 0].mean().abs() < 0.2
    else:
        assert rightward > 0.9
    assert F_one.grad[:, 0].abs().max() <= 2 * 1.0 / 2 + 1e-6  # Δv clamped to [−1, 1], D = 2
    if exact == "both":  # unclamped, Δv is a velocity: (E_real − E_fake)/τ′ ≈ 3/τ′, τ′ ~ U(0.02, 0.5),
        F_one.grad = None  # so about 3·E[1/τ′] ≈ 20 on the mean (an x-space difference would be ≈ 3)
        run._bank_rectify_loss(model, F_one, (z - F_one).detach(), {}, clamp=1e3, max_time=0.5).sum().backward()
        assert F_one.grad[:, 0].mean() > 10


def test_branch_table_of_an_exact_model_is_bank_noise_and_of_a_wrong_one_is_not():
    torch.manual_seed(0)
    data = torch.randn(10_000, 2)
    args = toy_delta_v.parser.parse_args(["--table-bank", "10000", "--table-points", "300"])
    for band, r in toy_delta_v.branch_table(ExactForGaussianData(), data, args).items():
        assert r["|learned delta_v|"] == 0, band  # the two branches agree exactly
        assert r["real_error"] < 1.5 * r["bank_noise_at_samples"], band
        assert r["fake_error"] < 1.5 * r["bank_noise_at_samples"], band
        assert r["real_error_at_data"] < 1.5 * r["bank_noise_at_data"], band
        assert r["|bank delta_v|"] < 2 * r["bank_noise_at_samples"], band
        assert 0 < r["off_data_share"] < 0.2, band  # the Gaussian's tails, where the bank is sparse
    torch.manual_seed(0)
    wrong = toy_delta_v.branch_table(ExactForGaussianData(real_branch_scale=0.5), data, args)
    for band, r in list(wrong.items())[1:]:  # above τ′ = 0.05, where 10,000 points are precise enough
        assert r["real_error"] > 2 * r["bank_noise_at_samples"], band  # a real branch at half the velocity
        assert r["real_error_at_data"] > 2 * r["bank_noise_at_data"], band
        assert r["fake_error"] < 1.5 * r["bank_noise_at_samples"], band  # the fake branch is still exact
        # Its Δv is F/2, but the two distributions are the same, so the exact Δv is 0: all of it is error.
        assert r["|learned delta_v|"] > 2 * r["|bank delta_v|"] and r["delta_v_error"] > 0.8 * r["|learned delta_v|"], band


def test_branch_table_of_samples_off_the_data_compares_each_branch_with_its_own_bank():
    """The fake branch's error is measured against the bank of the model's samples, not the data's (so
    here it is no larger than bank noise); the learned Δv (fake − real) agrees with the bank's where the
    banks are precise (τ′ ≥ 0.2); in the sparsest bands (τ′ < 0.1) the bank's noise is larger at the
    samples, off the centre of the data, than at the data."""
    torch.manual_seed(0)
    args = toy_delta_v.parser.parse_args(["--table-bank", "10000", "--table-points", "300"])
    rows = toy_delta_v.branch_table(ShiftedSamples(), torch.randn(10_000, 2), args)
    for band, r in rows.items():
        assert r["fake_error"] < 1.5 * r["bank_noise_at_samples"], band
        assert r["real_error_at_data"] < 1.5 * r["bank_noise_at_data"], band
    for band in ("0.02-0.05", "0.05-0.1"):  # where the bank is sparsest: 1.48× or more on seeds 0–11
        assert rows[band]["bank_noise_at_samples"] > 1.3 * rows[band]["bank_noise_at_data"], band
    for band in ("0.2-0.3", "0.3-0.5"):
        r = rows[band]
        assert r["cosine"] > 0.9 and r["delta_v_error"] < 0.3 * r["|bank delta_v|"], band
        assert r["|learned delta_v|"] > 0.3 and r["fake_error"] < 0.2 * r["|learned delta_v|"], band


def test_bank_velocity_is_the_same_in_chunks():
    torch.manual_seed(0)
    bank, x_tau, tau = torch.randn(300, 2), torch.randn(70, 2), 0.05 + 0.9 * torch.rand(70)
    whole = (x_tau - toy_delta_v.posterior_mean(bank, x_tau, tau)) / tau[:, None]
    torch.testing.assert_close(toy_delta_v.bank_velocity(bank, x_tau, tau, chunk=16), whole)


def test_a_branch_read_from_the_model_is_the_models_own():
    """Gaussian data, and a model whose fake branch is exact and whose real branch runs at half the
    exact velocity. exact="real" pairs the bank's real branch with the model's (exact) fake one: Δv
    is the bank's noise, with no direction. exact="fake" reads the model's half-speed real branch:
    Δv = F − F/2 = F/2, pointing at the origin as F does (∇_F L = Δv here, D = 2)."""
    pulls = {}
    for exact in ("real", "fake"):
        torch.manual_seed(0)
        run = toy_delta_v.run_of_toy_2d(bank=2048, exact=exact)
        run.data = torch.randn(10_000, 2)
        z = torch.randn(512, 2)
        F_one = torch.zeros(512, 2, requires_grad=True)
        run._bank_rectify_loss(ExactForGaussianData(real_branch_scale=0.5), F_one, z, {}, max_time=0.5).sum().backward()
        toward_origin = ((F_one.grad * z).sum(1) < 0).float().mean()
        pulls[exact] = (F_one.grad.norm(dim=1).mean(), toward_origin)
    assert 0.35 < pulls["real"][1] < 0.65 and pulls["fake"][1] > 0.8
    assert pulls["fake"][0] > 1.5 * pulls["real"][0]
