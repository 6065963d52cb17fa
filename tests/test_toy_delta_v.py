"""benchmarks/toy_delta_v.py: its learned run is toy_2d.py's, its bank Δv points at the data, and a run."""
import importlib.util
import json
import os

import torch

import common
import toy_2d

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("toy_delta_v", os.path.join(HERE, "..", "benchmarks", "toy_delta_v.py"))
toy_delta_v = importlib.util.module_from_spec(spec)
spec.loader.exec_module(toy_delta_v)

TINY = ["--train-steps", "8", "--width", "16", "--num-eval", "300", "--device", "cpu"]


def test_the_learned_run_is_toy_2d_and_the_bank_run_is_not(tmp_path):
    results = toy_delta_v.main(TINY + ["--bank", "32", "--table-bank", "400", "--table-points", "50",
                                       "--out", str(tmp_path / "dv")])
    alone = toy_2d.main(TINY + ["--methods", "twinflow", "--out", str(tmp_path / "alone")])
    for key in ("nfe1", "nfe4", "nfe100"):
        assert results["swd"]["learned"][key] == alone["twinflow"][key], key
    assert results["swd"]["bank"]["nfe1"] != results["swd"]["learned"]["nfe1"]  # L_rectify's Δv did change
    assert (toy_2d.train.__name__, common.rectify_loss.__name__) == ("train", "rectify_loss")  # restored
    assert len(results["branches"]) == len(toy_delta_v.BANDS)
    for row in results["branches"].values():
        assert all(torch.isfinite(torch.tensor(v)) for v in row.values()) and -1 <= row["cosine"] <= 1
    assert json.loads((tmp_path / "dv" / "delta_v.json").read_text())["swd"] == results["swd"]


def test_bank_delta_v_moves_the_one_step_samples_toward_the_data():
    """A descent step on L_rectify moves x̂ = z − F along +Δv: with the data far to the right of
    the model's samples, the gradient on F must point right as well (∇_F L = 2·Δv / D)."""
    torch.manual_seed(0)
    run = toy_delta_v.run_of_toy_2d(bank=256)
    run.data = torch.tensor([3.0, 0.0]) + 0.1 * torch.randn(1000, 2)
    model = toy_2d.MLP(16)
    with torch.no_grad():  # a model whose one-step samples sit near the origin: x̂ = z − F ≈ 0
        model.net[-1].bias.zero_(), model.net[-1].weight.zero_()
    z = 0.2 * torch.randn(64, 2)
    F_one = torch.zeros(64, 2, requires_grad=True)
    run._bank_rectify_loss(model, F_one, (z - F_one).detach(), {}, max_time=0.5).sum().backward()
    assert (F_one.grad[:, 0] > 0).float().mean() > 0.9
    assert F_one.grad[:, 0].abs().max() <= 2 * 1.0 / 2 + 1e-6  # Δv clamped to [−1, 1], D = 2


def test_bank_velocity_is_the_same_in_chunks():
    torch.manual_seed(0)
    bank, x_tau, tau = torch.randn(300, 2), torch.randn(70, 2), 0.05 + 0.9 * torch.rand(70)
    whole = (x_tau - toy_delta_v.posterior_mean(bank, x_tau, tau)) / tau[:, None]
    torch.testing.assert_close(toy_delta_v.bank_velocity(bank, x_tau, tau, chunk=16), whole)
