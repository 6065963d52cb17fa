"""TwinFlow on CIFAR-10: one-step generation on the benchmark papers compare, with a stated FID protocol.

The skeleton of mnist_twinflow.py (config → data → model → loss from common.py → train → sample →
evaluate → save); `diff mnist_twinflow.py cifar_twinflow.py` shows what scaling changes: RGB data
with flips, a DDPM++-style UNet sized by flag, bf16 autocast and torch.compile on GPU, unconditional
by default (the literature's setting), and FID with Inception features instead of a small classifier.

    python cifar_twinflow.py --preset cpu --data-root data                  # a smoke run, minutes on a CPU
    torchrun --nproc_per_node 8 cifar_twinflow.py --preset gpu --compile    # the real run; --batch is global
    python cifar_twinflow.py --resume --out out/cifar_twinflow               # continue exactly (Ctrl-C or SIGTERM saves)
    python cifar_twinflow.py --sample --ckpt out/cifar_twinflow/checkpoint.pt
    torchrun --nproc_per_node 8 cifar_twinflow.py --fid --ckpt out/cifar_twinflow/checkpoint.pt --nfe 1

A training run writes to --out: checkpoint.pt (model, both EMAs, optimizer, step, RNG; replaced
atomically every --ckpt-every steps), grids.png and grid_nfe*.png (8×8 at 1, 2, 4 NFE and many
steps, from the 0.9999 EMA), losses.png and train.json (the global batch, time, config). --sample and
--fid write to eval/ beside --ckpt unless --out is given.

FID protocol (--fid): --num-fid samples (default 50,000) from the 0.9999 EMA (--ema) at --nfe, against the
50,000 CIFAR-10 training images, with torchmetrics' FrechetInceptionDistance (2048-d pool features
of the FID Inception-v3 weights, which torchmetrics fetches through torch-fidelity on first use).
Samples are rounded to 8-bit pixels ((x + 1)·127.5, rounded, as the training images are stored)
before Inception; torchmetrics' own float path, (x·255).byte(), would truncate instead. Under torchrun the samples are split across ranks and
torchmetrics sums the statistics. The result, with every setting above, is written to fid.json.
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
import torchmetrics
from torchmetrics.image.fid import FrechetInceptionDistance
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from common import sample, training_loss, update_ema

# ----------------------------------------------------------------------------------------------
# Config: a preset fills the defaults, any flag overrides it
# ----------------------------------------------------------------------------------------------
PRESETS = {
    # a smoke run: checks that everything works end to end, not a model worth sampling from
    "cpu": dict(train_steps=2000, batch=64, lr=1e-3, channels=32, mult="1,2,2", blocks=1, attn_res="8", dropout=0.0),
    # DDPM++-sized (63M parameters: 128 channels, 1,2,2,2, 4 blocks, attention at 16 px); constant lr
    "gpu": dict(train_steps=400_000, batch=512, lr=2e-4, channels=128, mult="1,2,2,2", blocks=4, attn_res="16",
                dropout=0.1),
}
METHODS = ("flow", "rcgm", "twinflow")
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default="cpu", choices=PRESETS)
parser.add_argument("--method", default="twinflow", choices=METHODS)
parser.add_argument("--data-root", default="data", help="holds cifar-10-batches-py/ (downloaded there if missing)")
parser.add_argument("--no-download", action="store_true", help="fail instead of downloading CIFAR-10")
parser.add_argument("--train-steps", type=int)
parser.add_argument("--batch", type=int, help="global batch (split across DDP ranks)")
parser.add_argument("--lr", type=float)
parser.add_argument("--channels", type=int, help="UNet base width")
parser.add_argument("--mult", help="width multipliers per resolution, from 32 px down, e.g. 1,2,2,2")
parser.add_argument("--blocks", type=int, help="ResBlocks per resolution")
parser.add_argument("--attn-res", help="resolutions with self-attention, e.g. 16 (empty: none)")
parser.add_argument("--dropout", type=float)
parser.add_argument("--class-cond", action="store_true", help="condition on the class (with a null class)")
parser.add_argument("--ema", type=float, default=0.9999, help="decay of the EMA sampled from (grids, FID)")
parser.add_argument("--target-ema", type=float, default=0.99,
                    help="decay of the EMA that builds the training targets (the authors: 0.99)")
parser.add_argument("--kappa", type=float, default=0.0, help="enhanced-target guidance κ; needs --class-cond")
parser.add_argument("--order", type=int, default=2, help="N of the RCGM consistency target")
parser.add_argument("--label-dropout", type=float, default=0.1, help="share of labels replaced by the null class")
parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
parser.add_argument("--compile", action="store_true", help="torch.compile the training model")
parser.add_argument("--many-steps", type=int, default=32, help="NFE of the 'many steps' column")
parser.add_argument("--out", default=None, help="default: out/cifar_{method} (--sample / --fid: eval/ beside --ckpt)")
parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
parser.add_argument("--ckpt-every", type=int, default=5000)
parser.add_argument("--log-every", type=int, default=50)
parser.add_argument("--sample", action="store_true", help="write grids from --ckpt")
parser.add_argument("--fid", action="store_true", help="FID of --ckpt's EMA at --nfe (see the protocol above)")
parser.add_argument("--ckpt", help="checkpoint for --sample / --fid")
parser.add_argument("--nfe", type=int, default=1, help="--fid: NFE of the samples")
parser.add_argument("--num-fid", type=int, default=50_000, help="--fid: how many samples")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def parse_args(argv=None):
    preset = parser.parse_known_args(argv)[0].preset
    args = parser.parse_args(argv, argparse.Namespace(**PRESETS[preset]))
    unset = argparse.Namespace(**{key: None for key in vars(args)})  # (--resume: what was given again)
    given_again = vars(parser.parse_known_args(argv, unset)[0])
    args.given = sorted(key for key, value in given_again.items() if value is not None)
    if (args.sample or args.fid) and args.ckpt and not args.out:  # into eval/ beside the checkpoint,
        args.out = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval")  # not over its run's files
    args.out = args.out or f"out/cifar_{args.method}"
    try:
        args.mult = [int(m) for m in str(args.mult).split(",")]
        args.attn_res = [int(r) for r in str(args.attn_res).split(",") if r.strip()]
    except ValueError:
        parser.error(f"--mult and --attn-res: comma-separated integers; got {args.mult!r}, {args.attn_res!r}")
    if args.resume:  # continue the run with its own settings, but for the flags given again (checked below)
        path = os.path.join(args.out, "checkpoint.pt")
        resume_settings(args, load_checkpoint(path, "--resume", mmap=True)["config"], path)
    # attention (at --attn-res and in the middle) splits C channels into max(1, C // 64) equal heads
    widths = [args.channels * m for level, m in enumerate(args.mult) if 32 >> level in args.attn_res]
    if not (1 <= len(args.mult) <= 4 and min(args.mult) > 0 and args.channels % 32 == 0
            and all(c % max(1, c // 64) == 0 for c in widths + [args.channels * args.mult[-1]])):
        parser.error(f"--channels a multiple of 32, --mult 1 to 4 positive integers (where there is attention, "
                     f"channels × mult must split into channels × mult // 64 equal heads); "
                     f"got {args.channels}, {args.mult!r}, {args.attn_res!r}")
    if (args.sample or args.fid) and not args.ckpt:
        parser.error("--sample and --fid need --ckpt PATH")
    if args.kappa and not args.class_cond:
        parser.error("--kappa (the enhanced target) needs --class-cond: guidance needs a class and a null class")
    if args.num_fid < 2:
        parser.error(f"--num-fid must be at least 2 (a Fréchet distance needs a covariance), got {args.num_fid}")
    for name in ("train_steps", "batch", "num_fid", "nfe", "many_steps", "ckpt_every", "log_every", "blocks", "order"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not (0 <= args.ema < 1 and 0 <= args.target_ema < 1 and 0 <= args.label_dropout < 1 and 0 <= args.dropout < 1):
        parser.error(f"--ema, --target-ema, --label-dropout and --dropout must be in [0, 1), got {args.ema}, "
                     f"{args.target_ema}, {args.label_dropout} and {args.dropout}")
    if args.many_steps in (1, 2, 4):  # the many-step column would overwrite the jumps' column of that NFE
        parser.error(f"--many-steps {args.many_steps}: 1, 2 and 4 NFE have columns of their own; pick another")
    if args.lr <= 0 or args.clip <= 0:  # (a clip ≤ 0 zeroes or flips every gradient)
        parser.error(f"--lr and --clip must be > 0, got {args.lr} and {args.clip}")
    if not (args.sample or args.fid or args.resume) and os.path.exists(os.path.join(args.out, "checkpoint.pt")):
        parser.error(f"--out {args.out} already holds a run's checkpoint: add --resume to continue it, "
                     f"or pick another --out (a new run would overwrite it)")
    if args.kappa and not args.label_dropout and not (args.sample or args.fid):
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
# Data: torchvision's CIFAR-10, held in memory as uint8 (150 MB); flips and scaling per batch
# ----------------------------------------------------------------------------------------------
def load_cifar(root, train, download=True):
    """→ (images (N, 3, 32, 32) uint8, labels (N,) long)."""
    try:
        dataset = torchvision.datasets.CIFAR10(root, train=train, download=download)
    except RuntimeError as e:  # not found / corrupted (download off)
        raise SystemExit(f"error: --data-root {root}: no CIFAR-10 in {root}/cifar-10-batches-py/ "
                         f"({str(e).splitlines()[0]}); point --data-root at a folder holding it")
    except OSError as e:  # the download itself failed
        raise SystemExit(f"error: --data-root {root}: CIFAR-10 is not there and downloading failed ({e}); "
                         f"point --data-root at a folder holding cifar-10-batches-py/")
    return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(dataset.targets)


def to_model_range(images, flip=False):
    """uint8 → float in [−1, 1]; with flip, a random horizontal flip per image."""
    x = images.float() / 127.5 - 1
    if flip:
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    return x


# ----------------------------------------------------------------------------------------------
# Model: a DDPM++-style UNet, F(x_t, t, tt[, y]) → a velocity
# ----------------------------------------------------------------------------------------------
class TimeFeatures(nn.Module):
    """[t, sin(ω t), cos(ω t)] for geometric ω in [1, 1000]. sin is odd, so the SIGN of t (real or
    fake trajectory) reaches the network: an embedding of |t| would make the twins identical."""

    def __init__(self, n=32):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(0, 3, n))

    def forward(self, t):
        angles = t[:, None] * self.freqs
        return torch.cat([t[:, None], angles.sin(), angles.cos()], 1)


def norm(channels):
    return nn.GroupNorm(min(32, channels // 4), channels)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, + the embedding (scale and shift), → dropout → conv; optional attention."""

    def __init__(self, c_in, c_out, emb_dim, dropout=0.0, attention=False):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.dropout = norm(c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight), nn.init.zeros_(self.conv2.bias)  # each block starts as identity
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attention = SelfAttention(c_out) if attention else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h) * (1 + scale) + shift)))
        h = self.skip(x) + h
        return h if self.attention is None else self.attention(h)


class SelfAttention(nn.Module):
    def __init__(self, channels, head_dim=64):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm, self.qkv = norm(channels), nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads); any device
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Down(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb):
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """DDPM++ layout: per resolution `blocks` ResBlocks (+ attention where asked), a strided-conv
    down-sample; a mirrored up path with `blocks + 1` ResBlocks, each concatenating a skip. The
    embedding is MLP(features(t), features(tt)) (+ embed(y), class `num_classes` being null)."""

    def __init__(self, channels=128, mult=(1, 2, 2, 2), blocks=4, attn_res=(16,), dropout=0.1, num_classes=0,
                 resolution=32):
        super().__init__()
        emb_dim, self.null_class = 4 * channels, num_classes
        self.time = TimeFeatures()
        self.time_mlp = nn.Sequential(nn.Linear(2 * 65, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.down, skips, width, res = nn.ModuleList(), [channels], channels, resolution
        for level, m in enumerate(mult):
            for _ in range(blocks):
                self.down.append(ResBlock(width, channels * m, emb_dim, dropout, res in attn_res))
                width = channels * m
                skips.append(width)
            if level < len(mult) - 1:
                self.down.append(Down(width))
                skips.append(width)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(width, width, emb_dim, dropout, True), ResBlock(width, width, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(width + skips.pop(), channels * m, emb_dim, dropout, res in attn_res))
                width = channels * m
            if level > 0:
                self.up.append(Up(width))
                res *= 2
        self.head = nn.Sequential(norm(width), nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, x_t, t, tt, y=None):
        emb = self.time_mlp(torch.cat([self.time(t), self.time(tt)], 1))
        if self.label is not None:
            emb = emb + self.label(y)
        h = self.stem(x_t)
        hs = [h]
        for block in self.down:
            h = block(h, emb)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], 1), emb) if isinstance(block, ResBlock) else block(h, emb)
        return self.head(h)


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic (write, then rename), with everything an exact resume needs
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path, model, ema, target_ema, opt, step, logs, args, seconds):
    device = next(model.parameters()).device
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "target_ema": target_ema.state_dict(),
             "opt": opt.state_dict(), "step": step, "seconds": seconds,
             "logs": logs, "config": {k: v for k, v in vars(args).items()},
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


ARCHITECTURE = ("channels", "mult", "blocks", "attn_res", "class_cond")
# What describes this invocation, not the run: --resume never takes these from the checkpoint.
THIS_INVOCATION = ("out", "resume", "device", "data_root", "no_download", "compile", "sample", "fid", "ckpt",
                   "nfe", "num_fid", "given")


def resume_settings(args, config, path):
    """--resume continues the checkpoint's run: every setting not given on this command line takes the
    run's value (so `--resume --out DIR` needs nothing else). A different --method, --preset or
    architecture is refused; any other flag given again (a longer --train-steps, a new --lr) wins, and is reported."""
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
    return UNet(config["channels"], config["mult"], config["blocks"], config["attn_res"], config["dropout"],
                num_classes=10 if config["class_cond"] else 0)


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
    # Two EMA copies, both in eval mode (no dropout). The targets (RCGM's consistency target, the
    # enhanced target, and Δv when there is dropout) come from a short one, 0.99 as the authors': a
    # 0.9999 one averages over the last 10,000 steps, far too stale. Samples and FID use the long one.
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    target_ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    step, logs, saved = 0, [], None  # saved: the step of the checkpoint on disk
    if state:
        try:
            model.load_state_dict(state["model"]), ema.load_state_dict(state["ema"])
            # (checkpoints before 2026-11-28 had one EMA: the 0.99 one then starts from the model)
            target_ema.load_state_dict(state.get("target_ema", state["model"]))
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
    images, labels = load_cifar(args.data_root, train=True, download=not args.no_download and rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()
    images, labels = images.to(device), labels.to(device)
    net = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    net = torch.compile(net) if args.compile else net
    per_rank = args.batch // world
    if rank == 0:
        print(f"{args.method}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"world size {world}, global batch {per_rank * world}, device {device}, from step {step}")
    null = torch.full((per_rank,), model.null_class, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
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
            x, cond, null_cond = to_model_range(images[index], flip=True), {}, None
            if args.class_cond:
                y = torch.where(torch.rand(per_rank, device=device) < args.label_dropout, null, labels[index])
                cond, null_cond = {"y": y}, {"y": null}
            # Under autocast every network call runs in bf16, the target EMA's too; common.py does the
            # arithmetic on their outputs in float32, but ρ = (t − tt)/Δt·(F − F*) scales their
            # rounding by up to 100: one more reason for its clamp. With dropout, Δv comes from the
            # target EMA, since two calls of the live model would differ by their dropout masks.
            with autocast:
                loss, terms = training_loss(net, target_ema, x, method=args.method, cond=cond,
                                            null_cond=null_cond, kappa=args.kappa, order=args.order,
                                            rectify_with_ema=args.dropout > 0)
            bad = torch.tensor(float(not torch.isfinite(loss)), device=device)
            if world > 1:  # decide together, or the other ranks wait forever in backward()
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad:  # stop; the last checkpoint on disk is still good
                raise SystemExit(f"error: {args.method}: loss is {loss.item()} at step {step} (on some rank); "
                                 f"try a lower --lr, then --resume")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            if not torch.isfinite(grad_norm):  # (the same on every rank: DDP averaged the gradients)
                raise SystemExit(f"error: {args.method}: gradient norm is {grad_norm.item()} at step {step}; "
                                 f"try a lower --lr, then --resume")
            opt.step()
            update_ema(ema, model, args.ema, step)
            update_ema(target_ema, model, args.target_ema, step)
            if step % args.log_every == 0:
                if world > 1:  # the mean over ranks, for the log (gloo has no AVG)
                    for value in terms.values():
                        dist.all_reduce(value)
                logs.append({"step": step, **{k: v.item() / world for k, v in terms.items()}})
                bar.set_postfix(loss=f"{logs[-1]['loss']:.3f}", refresh=False)
            if rank == 0 and (step + 1) % args.ckpt_every == 0:
                save_checkpoint(path, model, ema, target_ema, opt, step + 1, logs, args, seconds())
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
                save_checkpoint(path, model, ema, target_ema, opt, step, logs, args, seconds())
            print(f"\ninterrupted: saved step {step} to {path}; continue with --resume")
        raise SystemExit(130)
    if rank == 0 and step != saved:  # (not twice when the last step was a --ckpt-every one)
        save_checkpoint(path, model, ema, target_ema, opt, step, logs, args, seconds())
    return ema, logs, step, seconds()


# ----------------------------------------------------------------------------------------------
# Sample
# ----------------------------------------------------------------------------------------------
def generate(model, method, labels, nfe, many_steps, generator, batch=500):
    """Samples in [−1, 1], in batches; labels None for an unconditional model."""
    device = next(model.parameters()).device
    # flow was never asked for jumps, so it gets the plain ODE (Euler); the any-step models jump
    # grid time to grid time; every model's many-step column is the ODE.
    style = "mul" if method == "flow" or nfe == many_steps else "any"
    out = []
    for y in labels.split(batch):
        z = torch.randn(len(y), 3, 32, 32, generator=generator).to(device)
        cond = {"y": y.to(device)} if model.label is not None else {}
        out.append(sample(model, z, steps=nfe, style=style, cond=cond).clamp(-1, 1).cpu())
    return torch.cat(out)


def write_grids(model, method, out, many_steps, seed):
    """grid_nfe{k}.png: 8×8 (class-conditional: row i = class i, 8 classes); grids.png: all side by side."""
    labels = torch.arange(8).repeat_interleave(8)
    columns = [1, 2, 4, many_steps]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.5))
    for ax, nfe in zip(axes, columns):
        samples = generate(model, method, labels, nfe, many_steps, torch.Generator().manual_seed(seed))
        grid = make_grid(samples, nrow=8, value_range=(-1, 1), normalize=True, pad_value=1)
        save_image(grid, os.path.join(out, f"grid_nfe{nfe}.png"))
        ax.imshow(grid.permute(1, 2, 0).numpy()), ax.set_title(f"{method}, {nfe} NFE", fontsize=10), ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "grids.png"), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Evaluate: FID with Inception features (see the protocol in the docstring)
# ----------------------------------------------------------------------------------------------
def to_uint8(x):
    """[−1, 1] images → uint8 pixels, rounded to the nearest of the 256 levels (exact for the data)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def fid_features():
    """2048: torchmetrics' FID Inception-v3 pool features. The tests swap in a tiny stand-in."""
    return 2048


@torch.no_grad()
def compute_fid(model, method, args, rank, world, device, batch=250):
    feature = fid_features()
    metric_device = torch.device("cpu") if device.type == "mps" else device  # float64 statistics: not on MPS
    fid = FrechetInceptionDistance(feature=feature).to(metric_device)  # takes uint8 pixels
    if world > 1 and rank > 0:  # rank 0 downloads first (if it must); the others then read its files
        dist.barrier()
    images, _ = load_cifar(args.data_root, train=True, download=not args.no_download and rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()
    for x in images[rank::world].split(batch):  # the reference: all 50,000 training images
        fid.update(x.to(metric_device), real=True)  # (stored as uint8)
    labels = torch.arange(rank, args.num_fid, world) % 10  # this rank's share; classes spread evenly
    generator = torch.Generator().manual_seed(args.seed + 10_000 * rank)
    for y in tqdm(labels.split(batch), desc=f"FID {args.nfe} NFE", disable=rank != 0):
        x = generate(model, method, y, args.nfe, args.many_steps, generator, batch)
        fid.update(to_uint8(x).to(metric_device), real=False)
    value = fid.compute().item()  # torchmetrics sums the statistics over ranks first
    return value, f"Inception-v3 pool ({feature})" if feature == 2048 else type(feature).__name__


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


# ----------------------------------------------------------------------------------------------
# Main: train → sample → save, or --sample / --fid a checkpoint
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    try:  # (the process group is torn down on every exit: a NaN stop, Ctrl-C, a bad flag)
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
        if args.sample or args.fid:
            return sample_or_fid(args, rank, world, device)
        if args.batch // world < 4:
            parser.error(f"--batch {args.batch} over {world} rank(s): each needs at least 4 (twinflow splits in 4)")
        ema, logs, step, seconds = train(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()
    seconds = round(seconds, 1)  # training only, summed over every --resume
    if rank != 0:
        return None
    plot_losses(os.path.join(args.out, "losses.png"), logs)
    write_grids(ema.eval(), args.method, args.out, args.many_steps, args.seed + 2)
    result = {"method": args.method, "train_seconds": seconds, "steps": step, "world_size": world,
              "global_batch": args.batch // world * world, "device": str(device),
              "parameters": sum(p.numel() for p in ema.parameters()), "config": vars(args)}
    write_json(os.path.join(args.out, "train.json"), result)
    print(f"wrote {args.out}/ ({seconds:.0f} s)")
    return result


def sample_or_fid(args, rank, world, device):
    """--sample: grids of --ckpt's EMA; --fid: its FID at --nfe, into fid.json."""
    state = load_checkpoint(args.ckpt, "--ckpt")
    try:  # a checkpoint of another model, or of other data, does not fit
        model = build_model(state["config"]).to(device)
        model.load_state_dict(state["ema"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise SystemExit(f"error: --ckpt {args.ckpt}: does not fit this script's model "
                         f"({type(e).__name__}: {str(e).splitlines()[0]})")
    model.eval().requires_grad_(False)
    method = state["config"]["method"]
    if args.sample and rank == 0:
        write_grids(model, method, args.out, args.many_steps, args.seed + 2)
        print(f"wrote {args.out}/grids.png")
    if not args.fid:
        return None
    value, features = compute_fid(model, method, args, rank, world, device)
    style = "mul" if method == "flow" or args.nfe == args.many_steps else "any"  # as generate() samples
    result = {"fid": value, "nfe": args.nfe, "style": style, "num_samples": args.num_fid,
              "weights": f"EMA {state['config']['ema']}", "seed": args.seed,
              "reference": "CIFAR-10 train split, 50,000 images", "features": features,
              "library": f"torchmetrics {torchmetrics.__version__}", "checkpoint": args.ckpt,
              "step": state["step"], "method": method, "world_size": world}
    if rank == 0:
        write_json(os.path.join(args.out, "fid.json"), result)
        print(f"FID {value:.3f} ({args.num_fid} samples, {args.nfe} NFE, EMA) → {args.out}/fid.json")
    return result


def write_json(path, result):
    """Atomically: a crash mid-write (after a long FID) keeps the last complete file."""
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
