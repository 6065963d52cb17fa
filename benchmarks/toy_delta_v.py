"""With toy_2d.py's TOY_LOSS, how good is the Δv that L_rectify follows, and what would a better one
be worth? One target, one seed, twinflow only.

L_rectify moves each one-step sample along Δv = F(x_τ′, −τ′) − F(x_τ′, τ′): the fake branch's
velocity minus the real branch's, read at x_τ′ = τ′·z + (1 − τ′)·x̂, x̂ the model's own one-step
samples. This script runs toy_2d.py twice from the same seed:

    learned  toy_2d.py as it is (the same numbers as its own twinflow run, to 15 significant digits)
    bank     L_rectify given a bank estimate of the exact Δv instead: with x_τ = τ·z + (1 − τ)·x,
             F(x_τ) = (x_τ − E[x | x_τ])/τ, and E[x | x_τ] over a bank of points is a softmax-weighted
             mean (benchmarks/toy_rectify.py's estimate). Each step it reads --bank data points and
             makes --bank one-step samples of the model L_rectify is given (the EMA, under
             TOY_LOSS), with τ′ ~ U(0.02, rectify_max_time). A diagnostic, not a method: it reads
             the data at every step. --exact real (or fake) takes only that branch from its bank
             and reads the other from the model, as TOY_LOSS does: which branch's error costs more.

and then, for the learned model, splits the error of its Δv between the two branches, by τ′ band:
each branch against its own bank estimate at the points L_rectify reads it (real bank: the 100,000
training points; fake bank: 100,000 one-step samples), and the real branch at points built the
same way from the data, where it is trained. The real branch's error is also split by whether the
one-step sample is off the data (farther than OFF_DATA from every training point), and each error
is given beside the bank's own noise, which it includes (the bank is sparse off the data).

    python benchmarks/toy_delta_v.py --target checkerboard --seed 0 --out out/toy_delta_v/checkerboard_s0
    # one thread, two runs at a time: about 5.5 min (training: 66 s learned, 135 s bank)
    python benchmarks/toy_delta_v.py --target checkerboard --seed 0 --runs bank --exact real --out ...

Writes --out/learned/ and --out/bank/ (toy_2d.py's files) and --out/delta_v.json (the SWDs of both
runs and the branch table; the branch table's Δv is unclamped, L_rectify clamps it to [−1, 1]).
The numbers in benchmarks/toy_findings.md ("The learned Δv is a limit") are
this script's output for seeds 0–7 on both targets (assets/toy_delta_v/), and with
--runs bank --exact real (or fake) in assets/toy_delta_v/exact_real/ (exact_fake/).
"""
import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]
import common  # noqa: E402  (the bank run swaps common.rectify_loss, see run_of_toy_2d)
import toy_2d  # noqa: E402
from common import interpolate, per_sample_mse, predict, sample  # noqa: E402
from toy_rectify import posterior_mean  # noqa: E402

BANDS = ((0.02, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.5))  # TOY_LOSS reads τ′ ≤ 0.5
OFF_DATA = 0.05  # a one-step sample this far (standardised units) from every training point is off the data
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--target", default="8gaussians", choices=toy_2d.TARGETS)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--train-steps", type=int, default=5000)
parser.add_argument("--width", type=int, default=256)
parser.add_argument("--bank", type=int, default=2048, help="points per bank for the bank run's Δv, each step")
parser.add_argument("--exact", default="both", choices=("both", "real", "fake"),
                    help="which branch of the bank run's Δv comes from its bank; the other from the model")
parser.add_argument("--runs", default="learned,bank", help="learned (with the branch table), bank, or both")
parser.add_argument("--table-bank", type=int, default=100_000,
                    help="points per bank for the branch table (the real bank is at most the 100,000 training points)")
parser.add_argument("--table-points", type=int, default=2000, help="points per τ′ band in the branch table")
parser.add_argument("--num-eval", type=int, default=20000)
parser.add_argument("--out", default="out/toy_delta_v")
parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (toy_2d.py's --device)")


# ----------------------------------------------------------------------------------------------
# The two runs: toy_2d.main, with the trained model and its data kept for the branch table
# ----------------------------------------------------------------------------------------------
class run_of_toy_2d:
    """Context manager around one toy_2d.main call: keeps the EMA model and the standardised
    training data (.model, .data); with bank=N, L_rectify gets the bank Δv from N points, of the
    branches named by exact ("both", "real" or "fake"; the model gives the other)."""

    def __init__(self, bank=None, exact="both"):
        self.bank, self.exact = bank, exact

    def __enter__(self):
        self.saved = toy_2d.train, common.rectify_loss
        toy_2d.train = self._train_keeping_model
        if self.bank:
            common.rectify_loss = self._bank_rectify_loss
        return self

    def _train_keeping_model(self, method, pool, args, device, gif_noise, normalize, denormalize):
        self.data = normalize(torch.from_numpy(pool)).to(device)
        ema, logs, frames = self.saved[0](method, pool, args, device, gif_noise, normalize, denormalize)
        self.model = ema
        return ema, logs, frames

    def _bank_rectify_loss(self, model, F_one_step, x_fake, cond, clamp=1.0, max_time=1.0):
        """common.rectify_loss with Δv = (E_real[x | x_τ′] − E_fake[x | x_τ′])/τ′ from two banks;
        a branch not in self.exact is read from the model instead, as its x̂ = x_τ′ − τ′·F (which
        gives back Δv = F_fake − F_real). Unconditional (the toys have no cond): the banks ignore cond."""
        with torch.no_grad():
            n, device = len(x_fake), x_fake.device
            tau = 0.02 + (max_time - 0.02) * torch.rand(n, device=device)  # the bank degrades as τ → 0
            x_tau = interpolate(x_fake, torch.randn_like(x_fake), tau)
            real_bank = self.data[torch.randint(len(self.data), (self.bank,), device=device)]
            fake_bank = sample(model, torch.randn(self.bank, *x_fake.shape[1:], device=device), steps=1)
            # Both banks are drawn even when --exact uses only one: the runs of every --exact then draw
            # the same random numbers, so their differences are the branch's, not a reshuffled seed's.
            exact = lambda branch: self.exact in ("both", branch)
            real_mean = posterior_mean(real_bank, x_tau, tau) if exact("real") else predict(model, x_tau, tau, tau)[0]
            fake_mean = posterior_mean(fake_bank, x_tau, tau) if exact("fake") else predict(model, x_tau, -tau, -tau)[0]
            delta_v = real_mean - fake_mean
            delta_v = (delta_v / tau[:, None]).clamp(-clamp, clamp)
        return per_sample_mse(F_one_step, (F_one_step - delta_v).detach())

    def __exit__(self, *exc):
        toy_2d.train, common.rectify_loss = self.saved


# ----------------------------------------------------------------------------------------------
# The branch table
# ----------------------------------------------------------------------------------------------
def bank_velocity(bank, x_tau, tau, chunk=100):
    """F(x_τ) = (x_τ − E[x | x_τ])/τ over a bank, in chunks (a 100,000-point bank: about 0.2 GB a chunk)."""
    means = [posterior_mean(bank, x_tau[i:i + chunk], tau[i:i + chunk]) for i in range(0, len(x_tau), chunk)]
    return (x_tau - torch.cat(means)) / tau[:, None]


def distance_to_data(bank, points, chunk=100):
    """Each point's distance to its nearest bank point."""
    return torch.cat([torch.cdist(points[i:i + chunk], bank).min(1).values for i in range(0, len(points), chunk)])


@torch.no_grad()
def branch_table(model, data, args):
    """Per τ′ band: each branch's error against its bank estimate where L_rectify reads it (the real
    branch's split by whether the one-step sample is off the data), the real branch's error where it
    is trained, and the learned Δv against the bank Δv. bank_noise: half the difference between the
    real-velocity estimates of the bank's two halves, about the full bank's own error: the errors
    above include it, and it grows where the bank is sparse (off the data)."""
    norm = lambda v: v.norm(dim=1).mean().item()
    noise = lambda n: torch.randn(n, 2, device=data.device)
    real_bank = data[torch.randperm(len(data), device=data.device)[: args.table_bank]]
    fake_bank = sample(model, noise(args.table_bank), steps=1)
    rows, n = {}, args.table_points
    for lo, hi in BANDS:
        tau = lo + (hi - lo) * torch.rand(n, device=data.device)
        x_hat = sample(model, noise(n), steps=1)
        x_tau = interpolate(x_hat, noise(n), tau)
        off = distance_to_data(real_bank, x_hat) >= OFF_DATA
        real, fake = predict(model, x_tau, tau, tau)[2], predict(model, x_tau, -tau, -tau)[2]
        real_exact, fake_exact = bank_velocity(real_bank, x_tau, tau), bank_velocity(fake_bank, x_tau, tau)
        x_data_tau = interpolate(real_bank[torch.randint(len(real_bank), (n,), device=data.device)], noise(n), tau)
        real_at_data = predict(model, x_data_tau, tau, tau)[2] - bank_velocity(real_bank, x_data_tau, tau)
        halves = real_bank.tensor_split(2)
        noise_of = lambda x: (bank_velocity(halves[0], x, tau) - bank_velocity(halves[1], x, tau)) / 2
        noise_at_samples, noise_at_data = noise_of(x_tau), noise_of(x_data_tau)
        learned, exact, real_error = fake - real, fake_exact - real_exact, real - real_exact
        rows[f"{lo}-{hi}"] = {
            "real_error": norm(real_error), "fake_error": norm(fake - fake_exact),
            "off_data_share": off.float().mean().item(),
            "real_error_off_data": norm(real_error[off]) if off.any() else None,
            "real_error_on_data": norm(real_error[~off]) if (~off).any() else None,
            "bank_noise_at_samples": norm(noise_at_samples),
            "bank_noise_off_data": norm(noise_at_samples[off]) if off.any() else None,
            "bank_noise_at_data": norm(noise_at_data),
            "real_error_at_data": norm(real_at_data), "|bank delta_v|": norm(exact),
            "|learned delta_v|": norm(learned), "delta_v_error": norm(learned - exact),
            "cosine": torch.nn.functional.cosine_similarity(learned, exact, dim=1).mean().item()}
    return rows


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    args = parser.parse_args(argv)
    for flag in ("bank", "table_bank", "table_points"):
        if getattr(args, flag) < 1:  # an empty bank would quietly give Δv = 0, or the learned run again
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    common_flags = ["--target", args.target, "--seed", str(args.seed), "--methods", "twinflow",
                    "--train-steps", str(args.train_steps), "--width", str(args.width),
                    "--num-eval", str(args.num_eval), "--device", args.device]
    results = {"target": args.target, "seed": args.seed, "train_steps": args.train_steps,
               "bank": args.bank, "exact": args.exact, "loss_settings": toy_2d.TOY_LOSS, "swd": {}}
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or set(runs) - {"learned", "bank"}:
        raise SystemExit(f"error: --runs {args.runs}: expected learned, bank or learned,bank")
    for name in [name for name in ("learned", "bank") if name in runs]:
        with run_of_toy_2d(args.bank if name == "bank" else None, args.exact) as run:
            report = toy_2d.main(common_flags + ["--out", os.path.join(args.out, name)])
        results["swd"][name] = {**report["twinflow"], "train_seconds": report["train_seconds"]["twinflow"]}
        if name == "learned":
            torch.manual_seed(args.seed + 3)
            results["branches"] = branch_table(run.model, run.data, args)
            torch.save(run.model.state_dict(), os.path.join(args.out, name, "ema.pt"))  # for more analysis

    print(f"\n{args.target}, seed {args.seed}: twinflow's SWD with the learned and the bank Δv"
          f" (the bank's: {'both branches' if args.exact == 'both' else 'the ' + args.exact + ' branch'})")
    for name, row in results["swd"].items():
        print(f"  {name:>8}: 1 NFE {row['nfe1']:.4f}   4 NFE {row['nfe4']:.4f}   100 NFE {row['nfe100']:.4f}")
    if "branches" not in results:
        return write(results, args)
    print("\nthe learned model, mean norms over each band (velocities in standardised coordinates):")
    print("(bank noise: the real bank's own error, at the samples, off the data, at the data)")
    print(f"{'τ′':>10} {'real err':>9} {'(off data / on)':>16} {'off share':>10} {'fake err':>9} "
          f"{'real err at data':>17} {'bank noise':>20} {'|bank Δv|':>10} {'|learned Δv|':>13} {'Δv err':>7} {'cosine':>7}")
    number = lambda v: f"{v:.3f}" if v is not None else "-"
    for band, r in results["branches"].items():
        split = f"{number(r['real_error_off_data'])} / {number(r['real_error_on_data'])}"
        noise = f"{r['bank_noise_at_samples']:.3f} {number(r['bank_noise_off_data'])} {r['bank_noise_at_data']:.3f}"
        print(f"{band:>10} {r['real_error']:9.3f} {split:>16} {r['off_data_share']:10.3f} {r['fake_error']:9.3f} "
              f"{r['real_error_at_data']:17.3f} {noise:>20} {r['|bank delta_v|']:10.3f} "
              f"{r['|learned delta_v|']:13.3f} {r['delta_v_error']:7.3f} {r['cosine']:+7.2f}")
    return write(results, args)


def write(results, args):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "delta_v.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
