"""benchmarks/toy_modes.py: its counts on data whose answer is known, read through samples.npz."""
import importlib.util
import os

import numpy as np
import pytest

import toy_2d

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("toy_modes", os.path.join(HERE, "..", "benchmarks", "toy_modes.py"))
toy_modes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(toy_modes)


def test_counts_on_8_gaussians_see_stray_samples_and_narrow_modes(tmp_path):
    rng = np.random.default_rng(0)
    data = toy_2d.make_target("8gaussians", 20_000, rng)
    nearest = toy_modes.CENTRES[np.linalg.norm(data[:, None] - toy_modes.CENTRES[None], axis=2).argmin(1)]
    narrow = nearest + 0.5 * (data - nearest)  # every mode at half its width
    blurred = data + 0.5 * rng.standard_normal(data.shape)  # mass between the modes
    np.savez(tmp_path / "samples.npz", data=data, narrow=narrow, blurred=blurred)
    rows = toy_modes.main([str(tmp_path / "samples.npz")])
    assert rows["data"][0] < 0.005 and rows["data"][1] == pytest.approx(0.12, abs=0.003)
    assert rows["narrow"][0] == 0 and rows["narrow"][1] == pytest.approx(0.06, abs=0.002)
    assert rows["blurred"][0] > 0.3


def test_counts_on_checkerboard_and_a_bad_file(tmp_path):
    data = toy_2d.make_target("checkerboard", 20_000, np.random.default_rng(0))
    flipped = data + [1.0, 0.0]  # one square to the right: every point on the wrong colour or off the board
    np.savez(tmp_path / "samples.npz", data=data, flipped=flipped)
    rows = toy_modes.main(["--target", "checkerboard", str(tmp_path / "samples.npz")])
    assert rows["data"][0] == 0 and rows["flipped"][0] == 1
    (tmp_path / "bad.npz").write_text("not an npz")
    with pytest.raises(SystemExit, match="not a readable samples.npz"):
        toy_modes.main([str(tmp_path / "bad.npz")])
