"""toy_2d.py end to end on a tiny budget, its data checks, and its metric."""
import json
import os

import numpy as np
import pytest
import torch

import toy_2d
from faults import counting_optimizer_steps, infinite_gradient


def test_every_builtin_target_is_finite_and_unit_scale():
    for name in toy_2d.TARGETS:
        x = toy_2d.make_target(name, 4000, np.random.default_rng(0))
        assert x.shape == (4000, 2) and x.dtype == np.float32 and np.isfinite(x).all()
        assert 0.5 < x.std() < 2.5, name


def test_every_mode_of_the_multimodal_targets_is_filled_evenly():
    x = toy_2d.make_target("8gaussians", 8000, np.random.default_rng(0))
    mode = np.round(np.arctan2(x[:, 1], x[:, 0]) / (2 * np.pi / 8)).astype(int) % 8
    assert np.all(np.abs(np.bincount(mode, minlength=8) - 1000) < 150)
    x = toy_2d.make_target("checkerboard", 8000, np.random.default_rng(0))  # 8 of the 4×4 unit squares
    column, row = np.floor(x[:, 0]).astype(int), np.floor(x[:, 1]).astype(int)
    assert x.min() >= -2 and x.max() <= 2 and np.all((column + row) % 2 == 0)  # the dark squares only
    counts = np.bincount((column + 2) * 4 + row + 2, minlength=16).reshape(4, 4)
    dark = (np.arange(4)[:, None] + np.arange(4)) % 2 == 0
    assert np.all(np.abs(counts[dark] - 1000) < 150)


def test_swd_metric():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2000, 2)), rng.standard_normal((2000, 2))
    assert toy_2d.swd(a, a) == 0
    assert toy_2d.swd(a, b) < 0.1  # two samples of one distribution: near the noise floor
    assert toy_2d.swd(a, b + 1.0) > 0.5  # a shifted one: far
    # W1 of a shift c along a unit direction d is |d·c|; averaged over directions, (2/π)·|c|
    assert abs(toy_2d.swd(a, a + [3.0, 0.0]) - 3 * 2 / np.pi) < 0.05 * 3 * 2 / np.pi
    torch.manual_seed(1)  # its directions are its own: the global seed does not move it
    first = toy_2d.swd(a, b)
    torch.manual_seed(2)
    assert toy_2d.swd(a, b) == first


def test_short_training_improves_one_step_quality_and_writes_everything(tmp_path):
    out = tmp_path / "run"
    report = toy_2d.main(["--methods", "twinflow", "--train-steps", "400", "--batch", "256",
                          "--lr", "3e-3", "--num-eval", "600", "--many-steps", "8",
                          "--out", str(out), "--device", "cpu"])
    for name in ["scatter.png", "twin_trajectories.png", "losses.png", "one_step_training.gif",
                 "metrics.json", "samples.npz"]:
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["twinflow"]) == {"nfe1", "nfe2", "nfe4", "nfe2_renoise", "nfe4_renoise", "nfe8"}
    assert metrics["noise_floor"] > 0
    samples = np.load(out / "samples.npz")
    assert samples["data"].shape == (600, 2) and samples["twinflow_nfe1"].shape == (600, 2)
    assert samples["twinflow_fake_nfe8"].shape == (600, 2)  # the fake branch's own samples
    assert not np.allclose(samples["twinflow_fake_nfe8"], samples["twinflow_nfe8"])  # not the real branch's
    # The GIF's first frame is the untrained model's 1-NFE output: training must beat it.
    reference = samples["data"]
    torch.manual_seed(0)
    untrained = toy_2d.MLP(256)
    noise = torch.randn(600, 2)
    start = untrained(noise, torch.ones(600), torch.zeros(600)).detach()
    mean, std = samples["data"].mean(0), samples["data"].std()
    start_swd = toy_2d.swd((noise - start).numpy() * std + mean, reference)
    assert report["twinflow"]["nfe1"] < 0.85 * start_swd  # measured: 0.16 vs 0.40 at the start (TOY_LOSS)


def test_user_data_file(tmp_path):
    points = np.random.default_rng(0).standard_normal((400, 2)).astype(np.float64) * 3 + 5
    path = tmp_path / "points.npy"
    np.save(path, points)
    report = toy_2d.main(["--data", str(path), "--methods", "flow", "--train-steps", "20",
                          "--num-eval", "100", "--many-steps", "5", "--out", str(tmp_path / "o")])
    assert report["target"] == str(path) and report["num_eval"] == 100
    samples = np.load(tmp_path / "o" / "samples.npz")
    # mapped back to the user's coordinates, mean and scale (the data: mean 5, std 3; measured 4.8 / 3.1)
    assert abs(samples["flow_nfe5"].mean() - 5) < 1 and 2 < samples["flow_nfe5"].std() < 4.5
    assert "flow_nfe4_renoise" not in samples  # flow has no jumps to re-noise


def test_a_user_file_is_shuffled_then_split_into_train_and_two_disjoint_held_out_sets(tmp_path, monkeypatch):
    """A sorted file: the held-out sets are a quarter each of the shuffled rows (at most --num-eval),
    the model trains on the other half only, batches come from all of it, and the metric scores
    against the held-out rows that samples.npz keeps as "data"."""
    points = np.stack([np.arange(400.0), np.random.default_rng(0).standard_normal(400)], 1)
    path = tmp_path / "sorted.npy"
    np.save(path, points)
    seen = {"pool": [], "batches": [], "scored_against": []}
    real_train, real_loss, real_swd = toy_2d.train, toy_2d.training_loss, toy_2d.swd
    monkeypatch.setattr(toy_2d, "train", lambda method, pool, *a: seen["pool"].append(pool) or real_train(method, pool, *a))
    monkeypatch.setattr(toy_2d, "training_loss", lambda m, e, x, **kw: seen["batches"].append(x) or real_loss(m, e, x, **kw))
    monkeypatch.setattr(toy_2d, "swd", lambda a, b, **kw: seen["scored_against"].append(b) or real_swd(a, b, **kw))
    report = toy_2d.main(["--data", str(path), "--methods", "flow", "--train-steps", "10", "--batch", "32",
                          "--many-steps", "5", "--out", str(tmp_path / "o")])  # the default --num-eval
    reference = np.load(tmp_path / "o" / "samples.npz")["data"]
    assert report["num_eval"] == 100 and reference.shape == (100, 2) and len(seen["pool"][0]) == 200
    rows = lambda x: set(np.round(x[:, 0]).astype(int).tolist())
    assert reference[:, 0].max() - reference[:, 0].min() > 300  # shuffled first: not the file's first rows
    noise_floor_set, *scored = seen["scored_against"]  # the second held-out quarter, then one per column
    assert len(scored) == 4 and all(np.array_equal(b, reference) for b in scored)  # flow: 1, 2, 4, 5 NFE
    held_out, pool = rows(reference) | rows(noise_floor_set), rows(seen["pool"][0])
    assert len(rows(noise_floor_set)) == 100 and not rows(reference) & rows(noise_floor_set)
    assert not held_out & pool and len(held_out | pool) == 400
    assert len(torch.unique(torch.cat(seen["batches"]), dim=0)) > 100  # drawn from all 200 rows


def test_the_ema_warms_up_and_every_method_gets_the_same_re_noising_draws(tmp_path, monkeypatch):
    steps, states = [], {}
    real_update, real_sample = toy_2d.update_ema, toy_2d.sample
    monkeypatch.setattr(toy_2d, "update_ema", lambda ema, model, decay, step=None: steps.append(step)
                        or real_update(ema, model, decay, step))

    def record_rng(model, noise, **how):
        if how.get("stochastic_ratio"):
            states.setdefault(how["steps"], []).append(torch.get_rng_state())
        return real_sample(model, noise, **how)
    monkeypatch.setattr(toy_2d, "sample", record_rng)
    toy_2d.main(["--methods", "rcgm,twinflow", "--train-steps", "3", "--num-eval", "50", "--many-steps", "3",
                 "--out", str(tmp_path)])
    assert steps == [0, 1, 2] * 2  # the warm-up decay needs the step
    assert sorted(states) == [2, 4] and all(len(s) == 2 and torch.equal(*s) for s in states.values())


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    (np.zeros((100, 3)), "expected shape"),
    (np.zeros((10, 2)), "expected shape"),
    (np.full((100, 2), np.nan), "finite"),
    (np.concatenate([np.zeros((99, 2)), [[np.nan, 0.0]]]), "finite"),
])
def test_bad_data_file_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "bad.npy"
    if content is not None:
        np.save(path, content)
    with pytest.raises(SystemExit, match=message):
        toy_2d.main(["--data", str(path), "--out", str(tmp_path / "o")])
    assert not os.path.exists(tmp_path / "o" / "metrics.json")


def test_bad_flags_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        toy_2d.main(["--methods", "flow,gan", "--out", str(tmp_path)])
    assert "--methods must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        toy_2d.main(["--batch", "2", "--out", str(tmp_path)])
    assert "--batch must be at least 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        toy_2d.main(["--train-steps", "0", "--out", str(tmp_path)])
    assert "--train-steps must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # its column would overwrite the 4-jump column
        toy_2d.main(["--many-steps", "4", "--out", str(tmp_path)])
    assert "1, 2 and 4 NFE have columns of their own" in capsys.readouterr().err


def test_a_nan_loss_is_a_one_line_error_and_keeps_the_methods_before_it(tmp_path, monkeypatch):
    """twinflow trains, then rcgm's loss is NaN: a one-line error, and twinflow's numbers are on disk."""
    real_loss = toy_2d.training_loss

    def nan_for_rcgm(model, ema, x, method, **kwargs):
        if method == "rcgm":
            return torch.tensor(float("nan"), requires_grad=True), {}
        return real_loss(model, ema, x, method=method, **kwargs)

    monkeypatch.setattr(toy_2d, "training_loss", nan_for_rcgm)
    with pytest.raises(SystemExit, match="error: rcgm: loss is nan at step 0"):
        toy_2d.main(["--methods", "twinflow,rcgm", "--train-steps", "2", "--num-eval", "50",
                     "--many-steps", "3", "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "nfe1" in metrics["twinflow"] and "rcgm" not in metrics
    samples = np.load(tmp_path / "samples.npz")
    assert samples["twinflow_nfe3"].shape == samples["twinflow_fake_nfe3"].shape == (50, 2)
    assert not any(k.startswith("rcgm") for k in samples)
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "samples.npz"]  # no temporary files left


def test_an_infinite_gradient_stops_before_the_update(tmp_path, monkeypatch):
    monkeypatch.setattr(toy_2d, "training_loss", infinite_gradient(toy_2d.training_loss))
    with counting_optimizer_steps() as steps, pytest.raises(SystemExit, match="twinflow: gradient norm is (inf|nan) at step 0"):
        toy_2d.main(["--methods", "twinflow", "--train-steps", "2", "--num-eval", "50", "--out", str(tmp_path)])
    assert steps == []


def test_unavailable_device_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="not available"):
        toy_2d.main(["--device", "cuda", "--out", str(tmp_path)])


def test_toy_loss_settings_and_the_authors_flag(tmp_path, monkeypatch):
    """By default the toy trains with TOY_LOSS; --authors-loss passes common.py's defaults."""
    seen = []
    real_loss = toy_2d.training_loss
    monkeypatch.setattr(toy_2d, "training_loss", lambda *a, **kw: seen.append(kw) or real_loss(*a, **kw))
    tiny = ["--methods", "twinflow", "--train-steps", "2", "--num-eval", "50", "--many-steps", "3"]
    toy = toy_2d.main(tiny + ["--out", str(tmp_path / "toy")])
    authors = toy_2d.main(tiny + ["--out", str(tmp_path / "authors"), "--authors-loss"])
    assert seen[0] == {"method": "twinflow", **toy_2d.TOY_LOSS} and seen[-1] == {"method": "twinflow"}
    assert toy["loss_settings"] == toy_2d.TOY_LOSS and authors["loss_settings"] == {}  # in metrics.json


def test_a_seed_reproduces_every_column_including_the_re_noised_ones(tmp_path):
    tiny = ["--methods", "rcgm", "--train-steps", "20", "--num-eval", "200", "--many-steps", "3"]
    first = toy_2d.main(tiny + ["--out", str(tmp_path / "a")])
    second = toy_2d.main(tiny + ["--out", str(tmp_path / "b")])
    other = toy_2d.main(tiny + ["--out", str(tmp_path / "c"), "--seed", "1"])
    assert first["rcgm"] == second["rcgm"] and first["rcgm"]["nfe2_renoise"] != other["rcgm"]["nfe2_renoise"]
    # the re-noised column is its own sampler, not a copy of the jumps
    assert first["rcgm"]["nfe2_renoise"] != first["rcgm"]["nfe2"]


def test_the_gif_follows_training_and_ends_on_the_ema_that_is_scored(tmp_path, monkeypatch):
    """A frame every train_steps/40 steps and one at the end, all from the EMA: the last frame is the
    1-NFE sample metrics.json scores (the same noise)."""
    frames, real_gif, real_sample = {}, toy_2d.save_gif, toy_2d.sample

    def keep_frames(path, all_frames, *args):
        frames.update(all_frames)
        return real_gif(path, all_frames, *args)

    def only_the_ema(model, *args, **kwargs):
        assert not any(p.requires_grad for p in model.parameters()), "sampled from the model being trained"
        return real_sample(model, *args, **kwargs)
    monkeypatch.setattr(toy_2d, "save_gif", keep_frames)
    monkeypatch.setattr(toy_2d, "sample", only_the_ema)
    toy_2d.main(["--methods", "flow,rcgm", "--train-steps", "40", "--num-eval", "200", "--many-steps", "3",
                 "--out", str(tmp_path)])
    samples = np.load(tmp_path / "samples.npz")
    for method in ("flow", "rcgm"):  # flow's frames are one Euler step, as its 1-NFE column
        assert len(frames[method]) == 41 and not np.allclose(frames[method][0], frames[method][-1])
        np.testing.assert_allclose(frames[method][-1], samples[f"{method}_nfe1"], rtol=1e-5, atol=1e-5)
