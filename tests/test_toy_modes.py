"""benchmarks/toy_modes.py: its counts on data whose answer is known, read through samples.npz."""
import importlib.util
import json
import os

import numpy as np
import pytest

import toy_2d

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("toy_modes", os.path.join(HERE, "..", "benchmarks", "toy_modes.py"))
toy_modes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(toy_modes)


def test_counts_on_8_gaussians_see_stray_samples_narrow_peaked_and_uneven_modes(tmp_path):
    rng = np.random.default_rng(0)
    data = toy_2d.make_target("8gaussians", 20_000, rng)
    fresh = toy_2d.make_target("8gaussians", 20_000, rng)  # another sample of the same distribution
    nearest = toy_modes.CENTRES[np.linalg.norm(data[:, None] - toy_modes.CENTRES[None], axis=2).argmin(1)]
    narrow = nearest + 0.5 * (data - nearest)  # every mode at half its width
    blurred = data + 0.5 * rng.standard_normal(data.shape)  # mass between the modes
    tangent = np.stack([-nearest[:, 1], nearest[:, 0]], 1) / 2
    peaked = nearest + tangent * rng.laplace(0, 0.12 / np.sqrt(2), (len(data), 1)) \
        + nearest / 2 * 0.12 * rng.standard_normal((len(data), 1))  # Laplace along the circle
    uneven = np.concatenate([data[nearest[:, 0] > 1.5], data])[:len(data)]  # mode 0 twice as heavy
    collapsed = nearest.copy()  # every mode a single point: no crash, no shape to repair
    np.savez(tmp_path / "samples.npz", data=data, fresh=fresh, narrow=narrow, blurred=blurred,
             peaked=peaked, uneven=uneven, collapsed=collapsed)
    rows = toy_modes.main([str(tmp_path / "samples.npz")])
    # off the modes, spread, peaked along, across, mass moved, SWD, SWD: shapes+mass, SWD: mass
    assert rows["data"][0] < 0.005 and rows["data"][1] == pytest.approx(0.12, abs=0.003)
    assert np.abs(rows["data"][2:4]).max() < 0.15 and np.isnan(rows["data"][4:]).all()
    assert rows["fresh"][4] < 0.02 and max(rows["fresh"][5:]) < 0.02  # sampling noise alone
    assert rows["narrow"][0] == 0 and rows["narrow"][1] == pytest.approx(0.06, abs=0.002)
    assert rows["narrow"][5] > 0.03 and rows["narrow"][6] < 0.015  # the repair restores the width
    assert rows["blurred"][0] > 0.3
    assert rows["peaked"][2] > 1.2 and abs(rows["peaked"][3]) < 0.15  # truncated at 4σ: below 3
    assert rows["uneven"][4] == pytest.approx(0.11, abs=0.01) and rows["uneven"][7] > 0.03
    assert rows["collapsed"][1] == 0 and rows["collapsed"][5] > 0.05


def test_counts_on_checkerboard_and_a_bad_file(tmp_path, capsys):
    data = toy_2d.make_target("checkerboard", 20_000, np.random.default_rng(0))
    flipped = data + [1.0, 0.0]  # one square to the right: every point on the wrong colour or off the board
    np.savez(tmp_path / "samples.npz", data=data, flipped=flipped)
    rows = toy_modes.main(["--target", "checkerboard", str(tmp_path / "samples.npz")])
    assert rows["data"][0] == 0 and rows["flipped"][0] == 1
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    printed = {words[0]: words[1:] for words in lines if words and words[0] in rows}
    assert printed["flipped"][0] == "100.00%" and printed["data"][0] == "0.00%"  # shares in %
    np.savez(tmp_path / "other.npz", data=data)
    with pytest.raises(SystemExit, match="holds other arrays"):  # runs that do not match: no silent mean
        toy_modes.main(["--target", "checkerboard", str(tmp_path / "samples.npz"), str(tmp_path / "other.npz")])
    (tmp_path / "metrics.json").write_text(json.dumps({"target": "checkerboard"}))  # toy_2d.py's, beside it
    with pytest.raises(SystemExit, match="trained on checkerboard"):  # 8 Gaussians' counts would look plausible
        toy_modes.main(["--target", "8gaussians", str(tmp_path / "samples.npz")])
    np.savez(tmp_path / "no_data.npz", twinflow_nfe1=data)
    with pytest.raises(SystemExit, match="no 'data' array"):
        toy_modes.main(["--target", "checkerboard", str(tmp_path / "no_data.npz")])
    (tmp_path / "bad.npz").write_text("not an npz")
    with pytest.raises(SystemExit, match="not a readable samples.npz"):
        toy_modes.main([str(tmp_path / "bad.npz")])


def test_several_files_give_the_mean_of_their_counts(tmp_path):
    """Three seeds' files whose shares off the squares are 0, 30 and 90 %: the row is their mean, 40 %
    (a median would say 30 %), and the row is the mean of the files' own rows."""
    data = toy_2d.make_target("checkerboard", 2_000, np.random.default_rng(0))
    paths = []
    for seed, share in enumerate((0.0, 0.3, 0.9)):
        moved = data.copy()
        moved[: int(share * len(data))] += [1.0, 0.0]  # one square to the right: off the squares
        os.makedirs(tmp_path / f"s{seed}")
        paths.append(str(tmp_path / f"s{seed}" / "samples.npz"))
        np.savez(paths[-1], data=data, moved=moved)
    rows = toy_modes.main(["--target", "checkerboard", *paths])
    assert rows["moved"][0] == pytest.approx(0.4)
    alone = [toy_modes.main(["--target", "checkerboard", path])["moved"] for path in paths]
    np.testing.assert_allclose(rows["moved"], np.mean(alone, 0))
