"""Where a toy model's samples go wrong: the counts that the SWD folds into one number.

    python toy_2d.py --out out/toy_2d && python benchmarks/toy_modes.py out/toy_2d/samples.npz
    python benchmarks/toy_modes.py --target checkerboard out/seeds/checkerboard_s*/samples.npz

For every array in samples.npz (the held-out data, then each method at each NFE, then twinflow's
fake branch), averaged over the files given (one per seed):
    8gaussians    off the modes: the share of samples farther than 0.48 (4σ) from every mode centre
                  spread: the per-coordinate RMS offset of the others from their nearest centre
                  (the data: 0.12). Too wide, the modes blur; too narrow, they have collapsed inward.
                  peaked: the excess kurtosis of each mode along the circle and across it (a
                  Gaussian: 0). Above 0, a mode is a sharp core with long tails, which its
                  spread hides.
                  mass moved: the share of the mass that would have to move between modes to
                  give each mode its share of the held-out data (strays count to their nearest).
                  SWD: to the held-out data, as toy_2d.py scores it; then after two repairs.
                  SWD, shapes+mass: every sample nearest to a mode (strays too) is redrawn from
                  that mode's on-mode samples, moved and scaled to the data's centre and
                  covariance. What is left is the modes' shapes and masses.
                  SWD, mass: the same with every mode a Gaussian of the data's σ: the masses
                  alone. Fresh samples of the data score 0.009 to 0.019 on either (0.014 on
                  average over 12 draws) and move 0.7 % to 1.6 % of the mass.
    checkerboard  off the squares: the share of samples outside the eight squares
The README's toy section and benchmarks/toy_findings.md use these counts to show what L_rectify
changes (stray samples, the width and the shape of each mode, and how well the fake branch knows
the one-step samples). They need
toy_2d.py's built-in geometry, so only these two targets.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from toy_2d import swd  # noqa: E402

RADIUS, SIGMA = 2.0, 0.12  # toy_2d.make_target("8gaussians"): centres on a circle of radius 2
CENTRES = RADIUS * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], 1)


def gaussian_counts(x, data=None):
    """→ (share off the modes, RMS offset within a mode, peakedness along and across the circle,
    mass moved, SWD, SWD of the shapes and masses, SWD of the masses) for 8 Gaussians samples
    x (N, 2); the last four need the held-out data (N, 2)."""
    distance = np.linalg.norm(x[:, None] - CENTRES[None], axis=2)
    off, nearest = distance.min(1) > 4 * SIGMA, distance.argmin(1)
    offsets = x[~off] - CENTRES[nearest[~off]]
    # Two repairs. Every sample nearest to mode k (its strays too) is redrawn either from that
    # mode's on-mode samples, whitened and placed at the centre with the data's σ (only the shape
    # is kept), or from a Gaussian of the data's σ at the centre (nothing of the mode is kept).
    # Both keep each mode's mass: the share of samples nearest to it.
    shapes, masses, kurtosis, rng = x.copy(), x.copy(), [], np.random.default_rng(0)
    for k, centre in enumerate(CENTRES):
        mode = (nearest == k) & ~off
        if mode.sum() < 3:  # too few to have a shape: left as they are
            continue
        centred = x[mode] - x[mode].mean(0)
        along = np.array([-centre[1], centre[0]]) / RADIUS  # the circle's tangent; across: the radius
        in_frame = centred @ np.stack([along, centre / RADIUS], 1)
        kurtosis.append((in_frame ** 4).mean(0) / np.maximum((in_frame ** 2).mean(0), 1e-150) ** 2 - 3)
        covariance = np.cov(centred.T) + 1e-12 * np.eye(2)  # + ε: a mode collapsed to a point
        whitened = centred @ np.linalg.inv(np.linalg.cholesky(covariance)).T
        n = (nearest == k).sum()
        shapes[nearest == k] = centre + SIGMA * whitened[rng.integers(0, mode.sum(), n)]
        masses[nearest == k] = centre + SIGMA * rng.standard_normal((n, 2))
    along, across = np.mean(kurtosis, 0) if kurtosis else (float("nan"),) * 2
    counts = (off.mean(), float(np.sqrt((offsets ** 2).mean())) if len(offsets) else float("nan"), along, across)
    if data is None:
        return counts + (float("nan"),) * 4
    data_nearest = np.linalg.norm(data[:, None] - CENTRES[None], axis=2).argmin(1)
    mass_moved = 0.5 * np.abs(np.bincount(nearest, minlength=len(CENTRES)) / len(x)
                              - np.bincount(data_nearest, minlength=len(CENTRES)) / len(data)).sum()
    return counts + (mass_moved, swd(x, data), swd(shapes, data), swd(masses, data))


def checkerboard_counts(x, data=None):
    """→ (share off the squares,) for checkerboard samples x (N, 2): the squares of the 4×4 board
    on [−2, 2]² whose integer corner (⌊x1⌋, ⌊x2⌋) has an even sum."""
    on = (np.abs(x) < 2).all(1) & (np.floor(x).sum(1) % 2 == 0)
    return (1 - on.mean(),)


SHARES = ("off the modes", "mass moved", "off the squares")  # printed in %


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="samples.npz files written by toy_2d.py")
    parser.add_argument("--target", default="8gaussians", choices=("8gaussians", "checkerboard"))
    args = parser.parse_args(argv)
    counts, header = (gaussian_counts, ("off the modes", "spread", "peaked: along", "across",
                                        "mass moved", "SWD", "SWD: shapes+mass", "SWD: mass")) \
        if args.target == "8gaussians" else (checkerboard_counts, ("off the squares",))
    runs = []
    for path in args.files:
        try:
            runs.append(dict(np.load(path)))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {path}: not a readable samples.npz ({e})")
    for path, run in zip(args.files, runs):
        if "data" not in run:
            raise SystemExit(f"error: {path} has no 'data' array (the held-out data): not toy_2d.py's samples.npz")
        metrics = os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.json")
        trained_on = json.load(open(metrics)).get("target") if os.path.exists(metrics) else None
        if trained_on is not None and trained_on != args.target:  # the counts would still look plausible
            raise SystemExit(f"error: {path} was trained on {trained_on} (its metrics.json), not --target {args.target}")
        if set(run) != set(runs[0]):
            raise SystemExit(f"error: {path} holds other arrays than {args.files[0]}: not the same runs")
    rows = {key: np.mean([counts(run[key], None if key == "data" else run["data"]) for run in runs], 0)
            for key in runs[0]}
    print(f"{args.target}, {len(runs)} file(s); shares in %; the data row is not compared with itself")
    print(f"{'samples':>20} " + " ".join(f"{h:>16}" for h in header))
    for key, row in rows.items():
        cells = [f"{'-':>16}" if np.isnan(v) else f"{100 * v:15.2f}%" if header[i] in SHARES else f"{v:16.3f}"
                 for i, v in enumerate(row)]
        print(f"{key:>20} " + " ".join(cells))
    return rows


if __name__ == "__main__":
    main()
