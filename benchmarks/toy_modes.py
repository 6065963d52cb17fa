"""Where a toy model's samples go wrong: the counts that the SWD folds into one number.

    python toy_2d.py --out out/toy_2d && python benchmarks/toy_modes.py out/toy_2d/samples.npz
    python benchmarks/toy_modes.py --target checkerboard out/seeds/checkerboard_s*/samples.npz

For every array in samples.npz (the held-out data, then each method at each NFE), averaged over the
files given (one per seed):
    8gaussians    off the modes: the share of samples farther than 0.48 (4σ) from every mode centre
                  spread: the per-coordinate RMS offset of the others from their nearest centre
                  (the data: 0.12). Too wide, the modes blur; too narrow, they have collapsed inward.
    checkerboard  off the squares: the share of samples outside the eight squares
The README's toy section uses these counts to show what L_rectify changes (stray samples against
the width of each mode). They need toy_2d.py's built-in geometry, so only these two targets.
"""
import argparse

import numpy as np

RADIUS, SIGMA = 2.0, 0.12  # toy_2d.make_target("8gaussians"): centres on a circle of radius 2
CENTRES = RADIUS * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], 1)


def gaussian_counts(x):
    """→ (share off the modes, RMS offset within a mode) for 8 Gaussians samples x (N, 2)."""
    distance = np.linalg.norm(x[:, None] - CENTRES[None], axis=2)
    off = distance.min(1) > 4 * SIGMA
    offsets = x[~off] - CENTRES[distance.argmin(1)[~off]]
    return off.mean(), float(np.sqrt((offsets ** 2).mean())) if len(offsets) else float("nan")


def checkerboard_counts(x):
    """→ (share off the squares,) for checkerboard samples x (N, 2): the squares of the 4×4 board
    on [−2, 2]² whose integer corner (⌊x1⌋, ⌊x2⌋) has an even sum."""
    on = (np.abs(x) < 2).all(1) & (np.floor(x).sum(1) % 2 == 0)
    return (1 - on.mean(),)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="samples.npz files written by toy_2d.py")
    parser.add_argument("--target", default="8gaussians", choices=("8gaussians", "checkerboard"))
    args = parser.parse_args(argv)
    counts, header = (gaussian_counts, ("off the modes", "spread")) if args.target == "8gaussians" \
        else (checkerboard_counts, ("off the squares",))
    runs = []
    for path in args.files:
        try:
            runs.append(dict(np.load(path)))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {path}: not a readable samples.npz ({e})")
    rows = {}
    for key in runs[0]:
        values = [counts(run[key]) for run in runs if key in run]
        rows[key] = np.mean(values, 0)
    print(f"{args.target}, {len(runs)} file(s); shares in %")
    print(f"{'samples':>20} " + " ".join(f"{h:>16}" for h in header))
    for key, row in rows.items():
        cells = [f"{100 * row[0]:15.2f}%"] + [f"{v:16.3f}" for v in row[1:]]
        print(f"{key:>20} " + " ".join(cells))
    return rows


if __name__ == "__main__":
    main()
