"""Why does TwinFlow, with the authors' loss settings, not beat RCGM on the 2D toys? Three measured
causes, one run. (What they led to: toy_2d.py's TOY_LOSS, common.py's switches turned on.)

L_rectify moves each one-step sample along Δv = F(x_τ, −τ) − F(x_τ, τ), the fake minus the real
velocity. Whether that helps depends on three things, and this script measures them on 8 Gaussians
(or --target), with toy_2d.py's MLP, data, budget and metric:

1. The leverage of L_rectify. On the one-step part the base target is sg(F) − clamp(ρ) with
   ρ = (F − F*)/Δt (t − tt = 1, Δt = 0.01), F* the consistency target. Its gradient, 2·clamp(ρ), is
   a spring of stiffness 1/Δt = 100 within Δt of F* and a constant pull beyond. L_rectify (weight
   0.5, averaged over the one-step quarter of the batch: 2·Δv per sample against the base term's
   clamp(ρ)) then moves the balance point only 2·Δt·Δv = 0.02·Δv away from F*. The "direct"
   variants replace, on the one-step part only, that target by F* itself: ‖F − sg(F*)‖², a pull
   1/Δt times softer near F* and a mean (not median-like) regression far from it.
2. The quality of Δv. The "oracle" variants replace the network's Δv by a bank estimate of the
   exact one between the data and the model's current one-step samples: with
   x_τ = τ·z + (1 − τ)·x, F(x_τ) = (x_τ − E[x | x_τ])/τ, and E[x | x_τ] over a bank of points is a
   softmax-weighted mean. It reads --bank data points and makes --bank one-step samples per step,
   and has its own sampling noise: a diagnostic, not a method.
3. What the fake branch costs the real one when both share the network (the controls below).

Variants (the same seed and init; after the first step the random draws differ between methods,
since twinflow and the oracle draw extra noise; --variants picks a subset):
    rcgm                    common.py, method="rcgm"
    twinflow                common.py, method="twinflow"
    rcgm+direct             rcgm, the one-step part regressed onto F*
    twinflow+direct         twinflow, the one-step part regressed onto F*, Δv from the EMA model
    twinflow+direct+live    the same with Δv from the model being trained, as common.py does
    twinflow+oracle         twinflow with the bank-estimated Δv
    twinflow+oracle+direct  both changes
    twinflow+no-rectify     twinflow with rectify_weight=0: the fake branch is trained, never used
    rcgm+3/4-batch          rcgm on 3/4 of the batch: as many real samples per step as twinflow has
    twinflow+two-networks   twinflow with the fake branch (t < 0) in a second MLP of its own
    twinflow+two-networks+direct   and the direct one-step target, Δv from the EMA (as +direct)
    twinflow+adv-0.25       twinflow with adv_weight=0.25: L_adv weighs less against the real parts
    twinflow+direct+adv-0.25   the same with the direct one-step target, Δv from the EMA
no-rectify, 3/4-batch and two-networks split twinflow's gap to rcgm into what L_rectify does, what
the adversarial quarter of the batch costs the real parts, and what sharing one network with the
fake branch costs; adv-0.25 asks whether one network can buy some of that back.

It prints the SWD at 1, 4 and 100 NFE (as in toy_2d.py); the share of one-step output coordinates
within Δt of F* at the last training step (|ρ| < 1: where the authors' clamp is inactive; for the
direct variants, where it would be); and, for the plain twinflow model, how its learned Δv compares
with the bank estimate at its own one-step samples (sizes, error and cosine by τ band; the learned
Δv unclamped).

    python benchmarks/toy_rectify.py                         # seed 0; one thread: 1.8–3.2 min per variant, 3.5–4 with the oracle
    OMP_NUM_THREADS=1 python benchmarks/toy_rectify.py --seed 1 --out out/toy_rectify_s1.json
The numbers in benchmarks/toy_findings.md ("Why the authors' settings hold L_rectify back") are this
script's output (seeds 0, 1, 2; assets/toy_rectify/).
"""
import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402  (the variants swap two of its functions, see patched())
import toy_2d  # noqa: E402
from common import interpolate, per_sample_mse, predict, sample  # noqa: E402

VARIANTS = ("rcgm", "twinflow", "rcgm+direct", "twinflow+direct", "twinflow+direct+live", "twinflow+oracle",
            "twinflow+oracle+direct", "twinflow+no-rectify", "rcgm+3/4-batch", "twinflow+two-networks",
            "twinflow+two-networks+direct", "twinflow+adv-0.25", "twinflow+direct+adv-0.25")
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--target", default="8gaussians", choices=toy_2d.TARGETS)
parser.add_argument("--variants", default=",".join(VARIANTS))
parser.add_argument("--train-steps", type=int, default=5000)
parser.add_argument("--batch", type=int, default=512)
parser.add_argument("--width", type=int, default=256)
parser.add_argument("--bank", type=int, default=2048, help="points per bank for the oracle Δv")
parser.add_argument("--num-eval", type=int, default=20000)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default=None, help="also write the results to this .json")


# ----------------------------------------------------------------------------------------------
# The exact Δv between two empirical distributions (banks of points): the oracle
# ----------------------------------------------------------------------------------------------
def posterior_mean(bank, x_tau, tau):
    """E[x | x_τ] for x uniform over bank and x_τ = τ·z + (1 − τ)·x: weights ∝ N(x_τ; (1 − τ)x, τ²)."""
    distance2 = (x_tau[:, None, :] - (1 - tau)[:, None, None] * bank[None]).pow(2).sum(-1)
    return torch.softmax(-distance2 / (2 * tau[:, None] ** 2), 1) @ bank


def exact_delta_v(real_bank, fake_bank, x_tau, tau):
    """F_fake − F_real with F = (x_τ − E[x | x_τ])/τ, i.e. (E_real[x | x_τ] − E_fake[x | x_τ])/τ."""
    return (posterior_mean(real_bank, x_tau, tau) - posterior_mean(fake_bank, x_tau, tau)) / tau[:, None]


class TwoNetworks(torch.nn.Module):
    """The fake branch in a network of its own: t > 0 goes to .real, t < 0 to .fake. A diagnostic:
    TwinFlow's point is ONE network; this measures what sharing it costs the real branch."""

    def __init__(self, width):
        super().__init__()
        self.real, self.fake = toy_2d.MLP(width), toy_2d.MLP(width)  # .real first: the same init as MLP

    def forward(self, x_t, t, tt):
        fake = t < 0
        F = torch.zeros_like(x_t)
        F[~fake] = self.real(x_t[~fake], t[~fake], tt[~fake])
        F[fake] = self.fake(x_t[fake], t[fake], tt[fake])
        return F


def one_step(model, n):
    ones = torch.ones(n)
    return predict(model, torch.randn(n, 2), ones, 0 * ones)[0]


# ----------------------------------------------------------------------------------------------
# The two swaps, installed for one training run
# ----------------------------------------------------------------------------------------------
class patched:
    """Context manager: swap common.base_target / common.rectify_loss for the variant's versions.
    training_loss() looks both up in common's namespace at call time, so nothing else changes."""

    def __init__(self, variant, data, ema, args, stats):
        self.variant, self.data, self.ema, self.args, self.stats = variant, data, ema, args, stats

    def __enter__(self):
        self.saved = common.base_target, common.rectify_loss
        base_target, rectify_loss = self.saved

        @torch.no_grad()
        def base(ema_model, F, x_t, t, tt, v_star, cond, order=2, plain=None):
            target = base_target(ema_model, F, x_t, t, tt, v_star, cond, order, plain)
            one = (t == 1) & (tt == 0)
            # F* = (Δt·v* + P)/(1 − 0) on the one-step part: the same EMA sub-steps as base_target.
            x, P, t_m = x_t[one] - common.DT * v_star[one], 0, 1 - common.DT
            for i in range(order):
                t_c, t_n = t_m * (1 - i / order), t_m * (1 - (i + 1) / order)
                F_ema = predict(ema_model, x, torch.full((len(x),), t_c), torch.full((len(x),), t_n),
                                **common.take(cond, one))[2]
                x, P = x - (t_c - t_n) * F_ema, P + (t_c - t_n) * F_ema
            F_star = common.DT * v_star[one] + P
            self.stats["unclamped"] = ((F[one] - F_star).abs() < common.DT).float().mean().item()
            if "direct" in self.variant:
                target[one] = F_star  # ‖F − sg(F*)‖²: no 1/Δt, no clamp
            return target

        def rectify(model, F_one_step, x_fake, cond, clamp=1.0, max_time=1.0):
            if "oracle" not in self.variant:  # "+direct": the EMA model's Δv, "+live": the model's
                ema_delta_v = "direct" in self.variant and "live" not in self.variant
                return rectify_loss(self.ema if ema_delta_v else model, F_one_step, x_fake, cond, clamp,
                                    max_time)
            with torch.no_grad():
                tau = torch.rand(len(x_fake)).clamp_min(0.02)  # the bank's estimate degrades as τ → 0
                x_tau = interpolate(x_fake, torch.randn_like(x_fake), tau)
                real_bank = self.data[torch.randint(len(self.data), (self.args.bank,))]
                delta_v = exact_delta_v(real_bank, one_step(model, self.args.bank), x_tau, tau)
                delta_v = delta_v.clamp(-clamp, clamp)
            return per_sample_mse(F_one_step, (F_one_step - delta_v).detach())

        common.base_target, common.rectify_loss = base, rectify
        return self

    def __exit__(self, *exc):
        common.base_target, common.rectify_loss = self.saved


# ----------------------------------------------------------------------------------------------
# Train, evaluate, compare Δv
# ----------------------------------------------------------------------------------------------
def train(variant, data, args):
    torch.manual_seed(args.seed)  # the same init for every variant (two-networks: .real only)
    model = TwoNetworks(args.width) if "two-networks" in variant else toy_2d.MLP(args.width)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats, method = {}, variant.split("+")[0]
    batch = args.batch * 3 // 4 if "3/4-batch" in variant else args.batch
    rectify_weight = 0.0 if "no-rectify" in variant else 0.5  # common.py's default
    adv_weight = 0.25 if "adv-0.25" in variant else 1.0  # common.py's default
    with patched(variant, data, ema, args, stats):
        for step in range(args.train_steps):
            x = data[torch.randint(len(data), (batch,))]
            loss, _ = common.training_loss(model, ema, x, method=method, rectify_weight=rectify_weight,
                                           adv_weight=adv_weight)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: {variant}: loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            common.update_ema(ema, model, 0.99, step)
    return ema, stats


@torch.no_grad()
def delta_v_agreement(model, data, n=2000):
    """Learned vs bank-estimated Δv at the model's own one-step samples, by τ band (20,000-point banks)."""
    real_bank, fake_bank = data[torch.randperm(len(data))[:20000]], one_step(model, 20000)
    rows = {}
    for lo, hi in ((0.02, 0.1), (0.1, 0.3), (0.3, 0.6), (0.6, 1.0)):
        tau = lo + (hi - lo) * torch.rand(n)
        x_tau = interpolate(one_step(model, n), torch.randn(n, 2), tau)
        learned = predict(model, x_tau, -tau, -tau)[2] - predict(model, x_tau, tau, tau)[2]
        exact = exact_delta_v(real_bank, fake_bank, x_tau, tau)
        rows[f"tau {lo}-{hi}"] = {
            "|exact|": exact.norm(dim=1).mean().item(), "|learned|": learned.norm(dim=1).mean().item(),
            "|error|": (learned - exact).norm(dim=1).mean().item(),
            "cosine": torch.nn.functional.cosine_similarity(learned, exact, dim=1).mean().item()}
    return rows


def main(argv=None):
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants must be a comma-separated subset of {','.join(VARIANTS)}, got {args.variants!r}")
    if args.bank < 1:  # an empty bank would quietly make the oracle variants no-rectify ones
        parser.error(f"--bank must be at least 1, got {args.bank}")
    if args.batch * 3 // 4 < 4:  # rcgm+3/4-batch needs 3 parts, twinflow 4: check before any training
        parser.error(f"--batch must be at least 6 (rcgm+3/4-batch trains on 3/4 of it, 4 rows at least), got {args.batch}")
    rng = np.random.default_rng(args.seed)  # toy_2d.py's data for this seed
    pool = toy_2d.make_target(args.target, 100_000, rng)
    reference = toy_2d.make_target(args.target, args.num_eval, rng)
    mean, std = torch.from_numpy(pool.mean(0)), float(pool.std())
    data = (torch.from_numpy(pool) - mean) / std
    eval_noise = torch.randn(args.num_eval, 2, generator=torch.Generator().manual_seed(args.seed + 1))
    swd = lambda x: toy_2d.swd((x * std + mean).numpy(), reference)

    results = {"target": args.target, "seed": args.seed, "train_steps": args.train_steps, "variants": {}}
    print(f"{'variant':>28} {'1 NFE':>8} {'4 NFE':>8} {'100 NFE':>8} {'|ρ|<1':>7} {'train s':>8}")
    for variant in variants:
        start = time.time()
        ema, stats = train(variant, data, args)
        row = {"nfe1": swd(sample(ema, eval_noise, steps=1)),
               "nfe4": swd(sample(ema, eval_noise, steps=4, style="any")),
               "nfe100": swd(sample(ema, eval_noise, steps=100, style="mul")),
               "unclamped_share": stats.get("unclamped", float("nan")),
               "train_seconds": round(time.time() - start, 1)}
        if variant == "twinflow":
            row["delta_v_agreement"] = delta_v_agreement(ema, data)
        results["variants"][variant] = row
        print(f"{variant:>28} {row['nfe1']:8.4f} {row['nfe4']:8.4f} {row['nfe100']:8.4f} "
              f"{row['unclamped_share']:7.2f} {row['train_seconds']:8.1f}", flush=True)
        write(results, args.out)  # after every variant: a later NaN or Ctrl-C keeps the finished ones
    if "twinflow" in results["variants"]:
        print("\ntwinflow (EMA): learned Δv against the bank estimate at its one-step samples")
        for band, r in results["variants"]["twinflow"]["delta_v_agreement"].items():
            print(f"  {band:>12}: |exact| {r['|exact|']:.3f}  |learned| {r['|learned|']:.3f}  "
                  f"|error| {r['|error|']:.3f}  cosine {r['cosine']:+.2f}")
    write(results, args.out)
    return results


def write(results, path):
    """Write the results to path (if given), atomically: a crash mid-write keeps the last file."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
