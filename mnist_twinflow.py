"""TwinFlow on MNIST: class-conditional digits in ONE network call, trained on a laptop CPU.

The same skeleton as toy_2d.py (config → data → model → loss from common.py → train → sample →
evaluate → save), with what images add: a small UNet, class labels with a null class, the
enhanced target (training-time guidance, κ), checkpoints, and an offline quality metric.

    python mnist_twinflow.py                                            # cpu preset: twinflow, 17 + 5 min on 2 cores
    python mnist_twinflow.py --method flow                              # the ablations: flow | rcgm | twinflow
    python mnist_twinflow.py --preset gpu                               # the public tutorial's scale
    python mnist_twinflow.py --resume --out out/mnist_twinflow          # continue exactly (Ctrl-C or SIGTERM saves)
    python mnist_twinflow.py --sample --ckpt out/mnist_twinflow/checkpoint.pt --nfe 1 --num 1000
    python mnist_twinflow.py --eval --ckpt out/mnist_twinflow/checkpoint.pt
    torchrun --nproc_per_node 4 mnist_twinflow.py --preset gpu          # DDP; --batch is the global batch

A training run writes to --out: checkpoint.pt (model, EMA, optimizer, step, RNG; replaced
atomically every --ckpt-every steps), grids.png (10×10, one row per class, at 1, 2, 4 NFE and
many steps), grid_nfe*.png, losses.png and metrics.json. --sample writes the grids and
samples_nfe{N}.pt = {"samples": (N, 1, 28, 28) in [−1, 1], "labels": (N,)}, classes spread evenly;
--sample and --eval write to eval/ beside --ckpt unless --out is given.

The metric (offline, no Inception weights needed): a small CNN classifier trained once on the MNIST
training split and cached (--classifier). We report the share of class-conditional samples it
assigns to their intended class, and the Fréchet distance between samples and the MNIST test split
in its 128-d feature space (torchmetrics' FID with this classifier as the feature extractor). That
number is comparable between runs scored by the same evaluator (the same --classifier file), NOT
with Inception FIDs from papers.
"""
import argparse
import copy
import json
import os
import signal
import time

import matplotlib

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.image.fid import FrechetInceptionDistance
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from common import sample, training_loss, update_ema

# ----------------------------------------------------------------------------------------------
# Config: a preset fills the defaults, any flag overrides it
# ----------------------------------------------------------------------------------------------
PRESETS = {
    # 2 CPU cores: 17 min of training to 98.6 % class accuracy at 1 NFE (README, "MNIST")
    "cpu": dict(train_steps=2500, batch=64, lr=1e-3, channels="16,32,64"),
    # the authors' MNIST tutorial: batch 128, 20 epochs (60,000 / 128 · 20 ≈ 9,400 steps), lr 2e-4
    "gpu": dict(train_steps=9400, batch=128, lr=2e-4, channels="64,128,256"),
}
METHODS = ("flow", "rcgm", "twinflow")
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default="cpu", choices=PRESETS)
parser.add_argument("--method", default="twinflow", choices=METHODS)
parser.add_argument("--data-root", default="data", help="holds MNIST/raw/ (downloaded there if missing)")
parser.add_argument("--no-download", action="store_true", help="fail instead of downloading MNIST")
parser.add_argument("--train-steps", type=int)
parser.add_argument("--batch", type=int, help="global batch (split across DDP ranks)")
parser.add_argument("--lr", type=float)
parser.add_argument("--channels", help="UNet widths at 28, 14 and 7 pixels, e.g. 32,64,64")
parser.add_argument("--ema", type=float, default=0.99,
                    help="one EMA builds the targets and is sampled (a short run: a 0.9999 copy, as CIFAR "
                         "and ImageNet sample, would barely move in 2,500 steps)")
parser.add_argument("--kappa", type=float, default=0.5, help="enhanced-target guidance κ (0: off)")
parser.add_argument("--order", type=int, default=2, help="N of the RCGM consistency target")
parser.add_argument("--label-dropout", type=float, default=0.1, help="share of labels replaced by the null class")
parser.add_argument("--many-steps", type=int, default=32, help="NFE of the 'many steps' column")
parser.add_argument("--num-eval", type=int, default=5000, help="samples per metric")
parser.add_argument("--classifier", default="out/mnist_classifier.pt", help="the evaluator, trained if missing")
parser.add_argument("--classifier-epochs", type=int, default=2)
parser.add_argument("--out", default=None, help="default: out/mnist_{method} (--sample / --eval: eval/ beside --ckpt)")
parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
parser.add_argument("--ckpt-every", type=int, default=500)
parser.add_argument("--log-every", type=int, default=10)
parser.add_argument("--sample", action="store_true", help="write grids and a samples .pt from --ckpt")
parser.add_argument("--eval", action="store_true", help="write metrics.json for --ckpt")
parser.add_argument("--ckpt", help="checkpoint for --sample / --eval")
parser.add_argument("--nfe", type=int, default=1, help="--sample: NFE of the samples .pt")
parser.add_argument("--num", type=int, default=1000, help="--sample: how many samples in the .pt")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def parse_args(argv=None):
    preset = parser.parse_known_args(argv)[0].preset
    args = parser.parse_args(argv, argparse.Namespace(**PRESETS[preset]))
    unset = argparse.Namespace(**{key: None for key in vars(args)})  # (--resume: what was given again)
    given_again = vars(parser.parse_known_args(argv, unset)[0])
    args.given = sorted(key for key, value in given_again.items() if value is not None)
    if (args.sample or args.eval) and args.ckpt and not args.out:  # into eval/ beside the checkpoint,
        args.out = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval")  # not over its run's files
    args.out = args.out or f"out/mnist_{args.method}"
    try:
        args.channels = [int(c) for c in str(args.channels).split(",")]
        assert len(args.channels) == 3 and all(c > 0 and c % 8 == 0 for c in args.channels)
    except (ValueError, AssertionError):
        parser.error(f"--channels: three multiples of 8, like 32,64,64; got {args.channels!r}")
    if args.resume:  # continue the run with its own settings, but for the flags given again (checked below)
        path = os.path.join(args.out, "checkpoint.pt")
        resume_settings(args, load_checkpoint(path, "--resume", mmap=True)["config"], path)
    if (args.sample or args.eval) and not args.ckpt:
        parser.error("--sample and --eval need --ckpt PATH")
    if args.num_eval < 2:
        parser.error(f"--num-eval must be at least 2 (a Fréchet distance needs a covariance), got {args.num_eval}")
    for name in ("train_steps", "batch", "num_eval", "num", "nfe", "many_steps", "ckpt_every", "log_every", "order",
                 "classifier_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.many_steps in (1, 2, 4):  # the many-step column would overwrite the jumps' column of that NFE
        parser.error(f"--many-steps {args.many_steps}: 1, 2 and 4 NFE have columns of their own; pick another")
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if not (args.sample or args.eval or args.resume) and os.path.exists(os.path.join(args.out, "checkpoint.pt")):
        parser.error(f"--out {args.out} already holds a run's checkpoint: add --resume to continue it, "
                     f"or pick another --out (a new run would overwrite it)")
    if not (0 <= args.ema < 1 and 0 <= args.label_dropout < 1):
        parser.error(f"--ema and --label-dropout must be in [0, 1), got {args.ema} and {args.label_dropout}")
    if args.kappa and not args.label_dropout and not (args.sample or args.eval):
        parser.error("--kappa needs --label-dropout > 0: the enhanced target reads the null class, "
                     "which only dropout trains")
    return args


def pick_device(name, local_rank=0):
    if name != "auto":
        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available.get(name.split(":")[0], False):
            raise SystemExit(f"error: --device {name}: not available here (try auto, cpu, cuda or mps)")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)  # a GPU per rank
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_distributed(args):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; plain `python` runs one process. → (rank, world, device)"""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, pick_device(args.device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(args.device, local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


# ----------------------------------------------------------------------------------------------
# Data: torchvision's MNIST, held in memory as one tensor in [−1, 1]
# ----------------------------------------------------------------------------------------------
def load_mnist(root, train, download=True):
    """→ (images (N, 1, 28, 28) float in [−1, 1], labels (N,) long)."""
    try:
        dataset = torchvision.datasets.MNIST(root, train=train, download=download)
    except RuntimeError as e:  # not found (download off) or every mirror failed
        why = "downloading failed" if download else "not found and --no-download given"
        raise SystemExit(f"error: --data-root {root}: no MNIST in {root}/MNIST/raw/ and {why} "
                         f"({str(e).splitlines()[0]}); point --data-root at a folder holding MNIST/raw/")
    return dataset.data.unsqueeze(1).float() / 127.5 - 1, dataset.targets.long()


# ----------------------------------------------------------------------------------------------
# Model: a small class-conditional UNet, F(x_t, t, tt, y) → a velocity
# ----------------------------------------------------------------------------------------------
class TimeFeatures(nn.Module):
    """[t, sin(ω t), cos(ω t)] for geometric ω in [1, 1000]. sin is odd, so the SIGN of t (real or
    fake trajectory) reaches the network: an embedding of |t| would make the twins identical."""

    def __init__(self, n=16):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(0, 3, n))

    def forward(self, t):
        angles = t[:, None] * self.freqs
        return torch.cat([t[:, None], angles.sin(), angles.cos()], 1)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNet(nn.Module):
    """28 → 14 → 7 pixels and back, one ResBlock per level, skip connections by concatenation.
    The embedding is MLP(features(t), features(tt)) + embed(y); class `num_classes` is the null class."""

    def __init__(self, channels=(32, 64, 64), num_classes=10):
        super().__init__()
        emb_dim, self.null_class = 4 * channels[0], num_classes
        self.time = TimeFeatures()
        self.time_mlp = nn.Sequential(nn.Linear(2 * 33, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes + 1, emb_dim)
        self.stem = nn.Conv2d(1, channels[0], 3, padding=1)
        widths = [channels[0], *channels]
        self.down = nn.ModuleList(ResBlock(a, b, emb_dim) for a, b in zip(widths[:-1], widths[1:]))
        self.mid = ResBlock(channels[-1], channels[-1], emb_dim)
        up_in = [channels[-1], *channels[::-1][:-1]]
        self.up = nn.ModuleList(ResBlock(a + c, c, emb_dim) for a, c in zip(up_in, channels[::-1]))
        self.head = nn.Sequential(nn.GroupNorm(8, channels[0]), nn.SiLU(), nn.Conv2d(channels[0], 1, 3, padding=1))

    def forward(self, x_t, t, tt, y):
        emb = self.time_mlp(torch.cat([self.time(t), self.time(tt)], 1)) + self.label(y)
        h, skips = self.stem(x_t), []
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.avg_pool2d(h, 2), emb)
            skips.append(h)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up):
            h = h if i == 0 else F.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips.pop()], 1), emb)
        return self.head(h)


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic (write, then rename), with everything an exact resume needs
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path, model, ema, opt, step, logs, args, seconds):
    device = next(model.parameters()).device
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
             "seconds": seconds, "logs": logs, "config": {k: v for k, v in vars(args).items()},
             "rng": {"cpu": torch.get_rng_state(),  # and the generator of the device we train on, if any
                     "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                     "mps": torch.mps.get_rng_state() if device.type == "mps" else None}}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-write leaves the previous checkpoint intact


def load_checkpoint(path, flag, mmap=False):
    if not os.path.isfile(path):
        raise SystemExit(f"error: {flag} {path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        missing = {"model", "ema", "opt", "step", "logs", "config", "rng"} - set(state)
    except Exception as e:
        raise SystemExit(f"error: {flag} {path}: not a readable checkpoint ({type(e).__name__}: {e})")
    if missing:
        raise SystemExit(f"error: {flag} {path}: not a checkpoint of this script (missing {sorted(missing)})")
    return state


ARCHITECTURE = ("channels",)
# What describes this invocation, not the run: --resume never takes these from the checkpoint.
THIS_INVOCATION = ("out", "resume", "device", "data_root", "no_download", "classifier", "sample", "eval", "ckpt",
                   "nfe", "num", "given")


def resume_settings(args, config, path):
    """--resume continues the checkpoint's run: every setting not given on this command line takes the
    run's value (so `--resume --out DIR` needs nothing else). A different --method, --preset or
    --channels is refused; any other flag given again (a longer --train-steps, a new --lr) wins, and is reported."""
    changed = []
    for key, saved in config.items():
        if key in THIS_INVOCATION or not hasattr(args, key):
            continue
        if key not in args.given:
            setattr(args, key, saved)
        elif saved != getattr(args, key):
            if key in ("method", "preset", *ARCHITECTURE):
                raise SystemExit(f"error: --resume {path}: trained with --{key.replace('_', '-')} {saved}, "
                                 f"not {getattr(args, key)}")
            changed.append(f"--{key.replace('_', '-')} {getattr(args, key)} (the run's: {saved})")
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"resume with {', '.join(changed)}")


def build_model(config):
    return UNet(config["channels"])


# ----------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------
def train(args, rank, world, device):
    path = os.path.join(args.out, "checkpoint.pt")
    state = load_checkpoint(path, "--resume") if args.resume else None  # (its settings: parse_args)
    seconds_before, started = (state.get("seconds", 0.0) if state else 0.0), time.time()
    seconds = lambda: seconds_before + time.time() - started  # training time, over every --resume
    torch.manual_seed(args.seed)  # the same initial weights on every rank and for every method
    model = build_model(vars(args)).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # eval: no dropout in the targets it builds
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    step, logs, saved = 0, [], None  # saved: the step of the checkpoint on disk
    if state:
        try:
            model.load_state_dict(state["model"]), ema.load_state_dict(state["ema"])
        except RuntimeError as e:  # (the settings match, the shapes do not: other data?)
            raise SystemExit(f"error: --resume {path}: does not fit this model ({str(e).splitlines()[0]})")
        opt.load_state_dict(state["opt"])
        if "lr" in args.given:  # a new --lr wins; without one, the optimizer state's saved lr goes on
            for group in opt.param_groups:
                group["lr"] = args.lr
        step, logs = state["step"], state["logs"]
        saved = step
        torch.set_rng_state(state["rng"]["cpu"])
        cuda_rng = state["rng"]["cuda"]
        if isinstance(cuda_rng, list):  # (checkpoints before 2026-11-28 held every GPU's; rank 0 used GPU 0)
            cuda_rng = cuda_rng[0]
        if cuda_rng is not None and device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng, device)
        if state["rng"].get("mps") is not None and device.type == "mps":
            torch.mps.set_rng_state(state["rng"]["mps"])
    if world > 1:  # each rank draws its own batches; exact resume holds for single-process runs
        torch.manual_seed(args.seed + 1000 * rank + step)
    if world > 1 and rank > 0:  # rank 0 downloads first (if it must); the others then read its files
        dist.barrier()
    images, labels = load_mnist(args.data_root, train=True, download=not args.no_download and rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()
    images, labels = images.to(device), labels.to(device)
    net = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    per_rank = args.batch // world
    if rank == 0:
        print(f"{args.method}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"world size {world}, global batch {per_rank * world}, device {device}, from step {step}")
    null = torch.full((per_rank,), model.null_class, device=device)
    bar = tqdm(range(step, args.train_steps), desc=args.method, disable=rank != 0, initial=step,
               total=args.train_steps)
    interrupted = []  # Ctrl-C (or a scheduler's SIGTERM) finishes the current step, then saves
    previous_handlers = {sig: signal.signal(sig, lambda *_: interrupted.append(True))
                         for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for step in bar:
            stop = torch.tensor(float(bool(interrupted)), device=device)
            if world > 1:  # every rank stops at the same step
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if stop:  # between two steps: no half-applied update, and the RNG state of a step boundary
                break
            index = torch.randint(len(images), (per_rank,), device=device)
            x, y = images[index], labels[index]
            y = torch.where(torch.rand(per_rank, device=device) < args.label_dropout, null, y)
            loss, terms = training_loss(net, ema, x, method=args.method, cond={"y": y},
                                        null_cond={"y": null}, kappa=args.kappa, order=args.order)
            bad = torch.tensor(float(not torch.isfinite(loss)), device=device)
            if world > 1:  # decide together, or the other ranks wait forever in backward()
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad:  # stop; the last checkpoint on disk is still good
                raise SystemExit(f"error: {args.method}: loss is {loss.item()} at step {step} (on some rank); "
                                 f"try a lower --lr, then --resume")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if not torch.isfinite(grad_norm):  # (the same on every rank: DDP averaged the gradients)
                raise SystemExit(f"error: {args.method}: gradient norm is {grad_norm.item()} at step {step}; "
                                 f"try a lower --lr, then --resume")
            opt.step()
            update_ema(ema, model, args.ema, step)
            if step % args.log_every == 0:
                if world > 1:  # the mean over ranks, for the log (gloo has no AVG)
                    for value in terms.values():
                        dist.all_reduce(value)
                logs.append({"step": step, **{k: v.item() / world for k, v in terms.items()}})
                bar.set_postfix(loss=f"{logs[-1]['loss']:.3f}", refresh=False)
            if rank == 0 and (step + 1) % args.ckpt_every == 0:
                save_checkpoint(path, model, ema, opt, step + 1, logs, args, seconds())
                saved = step + 1
        else:
            step = max(step, args.train_steps)  # (a resumed run may already be past --train-steps)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    stop = torch.tensor(float(bool(interrupted)), device=device)
    if world > 1:  # (a signal in the very last step stops here too, before the evaluation)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    if stop:
        if rank == 0:  # `step` is the first step not taken: resume starts there
            if step != saved:
                save_checkpoint(path, model, ema, opt, step, logs, args, seconds())
            print(f"\ninterrupted: saved step {step} to {path}; continue with --resume")
        raise SystemExit(130)
    if rank == 0 and step != saved:  # (not twice when the last step was a --ckpt-every one)
        save_checkpoint(path, model, ema, opt, step, logs, args, seconds())
    return ema, logs, step, seconds()


# ----------------------------------------------------------------------------------------------
# Sample
# ----------------------------------------------------------------------------------------------
def generate(model, method, labels, nfe, many_steps, seed, batch=500):
    """Class-conditional samples in [−1, 1], in batches, from fixed noise (seed)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    # flow was never asked for jumps, so it gets the plain ODE (Euler); the any-step models jump
    # grid time to grid time; every model's many-step column is the ODE.
    style = "mul" if method == "flow" or nfe == many_steps else "any"
    out = []
    for y in labels.split(batch):
        z = torch.randn(len(y), 1, 28, 28, generator=generator).to(device)
        out.append(sample(model, z, steps=nfe, style=style, cond={"y": y.to(device)}).clamp(-1, 1).cpu())
    return torch.cat(out)


def write_grids(model, method, out, many_steps, seed, metrics=None):
    """grid_nfe{k}.png: 10×10, row i = class i; grids.png: the four side by side."""
    labels = torch.arange(10).repeat_interleave(10)
    columns = [1, 2, 4, many_steps]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.9))
    for ax, nfe in zip(axes, columns):
        grid = make_grid(generate(model, method, labels, nfe, many_steps, seed), nrow=10,
                         value_range=(-1, 1), normalize=True, pad_value=1)
        save_image(grid, os.path.join(out, f"grid_nfe{nfe}.png"))
        title = f"{method}, {nfe} NFE"
        if metrics:
            title += f"\nacc {metrics[f'nfe{nfe}']['accuracy']:.1%}  FD {metrics[f'nfe{nfe}']['fd']:.2f}"
        ax.imshow(grid.permute(1, 2, 0).numpy()), ax.set_title(title, fontsize=10), ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "grids.png"), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Evaluate: a small classifier, trained once on the training split, cached
# ----------------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """forward → 128-d features (what the Fréchet distance compares); head(features) → logits."""
    num_features = 128  # read by torchmetrics

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.body(x)


def get_classifier(args, device):
    """Load the cached evaluator, or train it (≈ 1 min on 2 CPU cores) and cache it."""
    if os.path.isfile(args.classifier):
        try:
            classifier, cached = Classifier(), torch.load(args.classifier, map_location="cpu")
            classifier.load_state_dict(cached["model"])
        except Exception as e:
            raise SystemExit(f"error: --classifier {args.classifier}: unreadable ({e}); delete it to retrain")
        if "evaluator_seed" not in cached:  # trained before the evaluator was seeded: a different ruler
            print(f"warning: --classifier {args.classifier} predates the seeded evaluator; its FDs are not "
                  f"comparable with the README's newer numbers (delete it to retrain)")
        return classifier.to(device).eval().requires_grad_(False)
    images, labels = load_mnist(args.data_root, train=True, download=not args.no_download)
    test_images, test_labels = load_mnist(args.data_root, train=False, download=not args.no_download)
    # The evaluator is a measuring instrument: the same network for every run (on one device and torch
    # build), so a fixed seed (not --seed), set BEFORE it is built. Its initial weights used to come
    # from whatever random state the training before it had left, and every FD moved with them.
    torch.manual_seed(0)
    classifier = Classifier().to(device).train()
    opt = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    for _ in range(args.classifier_epochs):
        for index in tqdm(torch.randperm(len(images)).split(128), desc="classifier", leave=False):
            logits = classifier.head(classifier(images[index].to(device)))
            loss = F.cross_entropy(logits, labels[index].to(device))
            opt.zero_grad(set_to_none=True), loss.backward(), opt.step()
    classifier.eval().requires_grad_(False)
    accuracy = class_accuracy(classifier, test_images, test_labels)
    print(f"classifier: {accuracy:.2%} on the MNIST test split; cached at {args.classifier}")
    os.makedirs(os.path.dirname(os.path.abspath(args.classifier)), exist_ok=True)
    torch.save({"model": classifier.state_dict(), "test_accuracy": accuracy, "evaluator_seed": 0},
               args.classifier + ".tmp")
    os.replace(args.classifier + ".tmp", args.classifier)
    return classifier


@torch.no_grad()
def class_accuracy(classifier, images, labels, batch=1000):
    device = next(classifier.parameters()).device
    hits = sum((classifier.head(classifier(x.to(device))).argmax(1).cpu() == y).sum().item()
               for x, y in zip(images.split(batch), labels.split(batch)))
    return hits / len(labels)


@torch.no_grad()
def reference_statistics(classifier, real, batch=1000):
    """A torchmetrics FID in the classifier's features, holding the real images' statistics once."""
    device = next(classifier.parameters()).device
    device = torch.device("cpu") if device.type == "mps" else device  # float64 statistics: not on MPS
    fid = FrechetInceptionDistance(feature=copy.deepcopy(classifier), reset_real_features=False).to(device)
    for x in real.split(batch):
        fid.update(x.to(fid.device), real=True)
    return fid


@torch.no_grad()
def frechet_distance(fid, fake, batch=1000):
    fid.reset()  # forgets the previous fake images, keeps the real statistics
    for x in fake.split(batch):
        fid.update(x.to(fid.device), real=False)
    return fid.compute().item()


def evaluate(model, method, classifier, args):
    """Per NFE: accuracy of the intended class, and the Fréchet distance to the test split.
    The "data" row scores --num-eval real training digits the same way: the best to hope for."""
    download = not args.no_download
    (images, labels), (test_images, _) = (load_mnist(args.data_root, split, download) for split in (True, False))
    images, labels = images[: args.num_eval], labels[: args.num_eval]
    fid = reference_statistics(classifier, test_images)
    metrics = {"data": {"accuracy": class_accuracy(classifier, images, labels), "fd": frechet_distance(fid, images)}}
    labels = torch.arange(args.num_eval) % 10  # classes spread evenly
    for nfe in [1, 2, 4, args.many_steps]:
        start = time.time()
        samples = generate(model, method, labels, nfe, args.many_steps, args.seed + 1)
        metrics[f"nfe{nfe}"] = {"accuracy": class_accuracy(classifier, samples, labels),
                                "fd": frechet_distance(fid, samples),
                                "sample_seconds": round(time.time() - start, 1)}
    return metrics


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------
def plot_losses(path, logs):
    fig, ax = plt.subplots(figsize=(5, 3))
    steps = [row["step"] for row in logs]
    for term in [k for k in logs[0] if k != "step"]:
        values = np.array([row[term] for row in logs])
        window = min(10, len(values))
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[len(steps) - len(smooth):], smooth, label=term)
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(model, method, args, device, extra):
    """Evaluate, write grids, metrics.json, and print the table."""
    classifier = get_classifier(args, device)
    metrics = evaluate(model, method, classifier, args)
    write_grids(model, method, args.out, args.many_steps, args.seed + 2, metrics)
    result = {"method": method, "metric": "accuracy of the intended class by a CNN classifier; Fréchet "
              "distance in its 128-d features to the MNIST test split", "num_eval": args.num_eval,
              "seed": args.seed, "device": str(device), **extra, **metrics}
    path = os.path.join(args.out, "metrics.json")
    with open(path + ".tmp", "w") as f:  # atomically: a crash mid-write keeps the last complete file
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"\n{'NFE':>5} {'accuracy':>9} {'FD':>8}")
    for nfe in ["data", 1, 2, 4, args.many_steps]:
        row = metrics[f"nfe{nfe}" if nfe != "data" else "data"]
        print(f"{nfe:>5} {row['accuracy']:9.2%} {row['fd']:8.3f}")
    print(f"wrote {args.out}/")
    return result


# ----------------------------------------------------------------------------------------------
# Main: train → sample → evaluate → save, or --sample / --eval a checkpoint
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.sample or args.eval:
        device = pick_device(args.device)
        state = load_checkpoint(args.ckpt, "--ckpt")
        try:  # a checkpoint of another model, or of other data, does not fit
            model = build_model(state["config"]).to(device)
            model.load_state_dict(state["ema"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise SystemExit(f"error: --ckpt {args.ckpt}: does not fit this script's model "
                             f"({type(e).__name__}: {str(e).splitlines()[0]})")
        model.eval().requires_grad_(False)
        method = state["config"]["method"]
        os.makedirs(args.out, exist_ok=True)
        if args.sample:
            write_grids(model, method, args.out, args.many_steps, args.seed + 2)
            labels = torch.arange(args.num) % 10
            path = os.path.join(args.out, f"samples_nfe{args.nfe}.pt")
            samples = generate(model, method, labels, args.nfe, args.many_steps, args.seed + 1)
            torch.save({"samples": samples, "labels": labels}, path)
            print(f"wrote {args.out}/grids.png and {path}: {tuple(samples.shape)} in [-1, 1]")
        if args.eval:
            extra = {"checkpoint": args.ckpt, "steps": state["step"], "weights": f"EMA {state['config']['ema']}"}
            if "seconds" in state:  # the checkpoint's training time, so benchmarks/mnist_table.py can show it
                extra["train_seconds"] = round(state["seconds"], 1)
            return report(model, method, args, device, extra)
        return None

    rank, world, device = setup_distributed(args)
    try:  # (the process group is torn down on every exit: a NaN stop, Ctrl-C, a bad flag)
        if args.batch // world < 4:
            parser.error(f"--batch {args.batch} over {world} rank(s): each needs at least 4 (twinflow splits in 4)")
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
        ema, logs, step, seconds = train(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()
    seconds = round(seconds, 1)  # training only, summed over every --resume
    if rank != 0:
        return None
    plot_losses(os.path.join(args.out, "losses.png"), logs)
    return report(ema.eval(), args.method, args, device,
                  {"train_seconds": seconds, "steps": step, "weights": f"EMA {args.ema}", "world_size": world,
                   "config": {k: v for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
