"""TwinFlow on ImageNet 256: class-conditional one-step generation in a VAE's latent space, multi-GPU.

The skeleton of cifar_twinflow.py; what changes at this scale: the data are VAE latents extracted
once (stage 1), the network is a DiT/SiT-style transformer whose `tt` embedder starts as a copy of
its `t` embedder, guidance comes from the enhanced target (κ), and FID needs decoding.

    # 1. encode an ImageFolder to latent shards (resumable; one shard per rank at a time)
    torchrun --nproc_per_node 8 imagenet_twinflow.py --extract --image-dir /data/imagenet/train --latents /data/in256_latents
    # 2. train on the latents (--batch is global; B/2 by default, --model XL/2 for the paper-scale one)
    torchrun --nproc_per_node 8 imagenet_twinflow.py --latents /data/in256_latents --compile
    # 3. look, and measure
    python imagenet_twinflow.py --sample --ckpt out/imagenet_twinflow/checkpoint.pt
    torchrun --nproc_per_node 8 imagenet_twinflow.py --fid --ckpt out/imagenet_twinflow/checkpoint.pt \\
        --fid-ref VIRTUAL_imagenet256_labeled.npz --nfe 1

--extract: center crop to --resolution (resize the short side, then crop, as ADM/DiT do), optional
flipped copies, AutoencoderKL from diffusers (--vae: a hub id or a local folder), latents sampled from
the posterior and multiplied by the VAE's scaling factor, written as shard_NNNNN.pt files of
{"latents": float16 (n, C, h, w), "labels": (n,)} plus meta.json (VAE, scaling factor, classes).
Training memory-maps the shards and moves only each batch to the device: the data stay in the page
cache, one copy for all ranks (ImageNet with flips: 1.28M × 2 × 4×32×32 × 2 bytes ≈ 19.5 GiB).
Training writes checkpoint.pt (atomic, with both EMAs, optimizer, step, RNG) and train.json; --sample writes
grid_nfe*.png (rows: --classes); --fid writes fid.json (protocol: README, and the fid() docstring);
both write to eval/ beside --ckpt unless --out is given (and need no --latents: the checkpoint
knows its VAE and classes). Ctrl-C or SIGTERM finishes the step and saves. torchrun sends SIGKILL
30 s after it forwards a SIGTERM, and an XL/2 checkpoint (model, two EMAs, AdamW) is about 13.5 GB:
launch long runs with `torchrun --shutdown-timeout 600 ...`.
"""
import argparse
import copy
import glob
import json
import math
import os
import signal
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.image.fid import FrechetInceptionDistance
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from common import sample, training_loss, update_ema

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
MODELS = {  # DiT / SiT sizes: (depth, hidden size, heads); patch size 2
    "S/2": (12, 384, 6), "B/2": (12, 768, 12), "L/2": (24, 1024, 16), "XL/2": (28, 1152, 16)}
METHODS = ("flow", "rcgm", "twinflow")
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--extract", action="store_true", help="stage 1: encode --image-dir to --latents")
parser.add_argument("--image-dir", help="an ImageFolder (one sub-folder per class)")
parser.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="hub id or local diffusers folder")
parser.add_argument("--resolution", type=int, default=256, help="a multiple of 16")
parser.add_argument("--flip-copies", action="store_true", help="also encode each image mirrored")
parser.add_argument("--shard-size", type=int, default=10_000, help="images per shard")
parser.add_argument("--workers", type=int, default=4, help="data-loading processes for --extract")
parser.add_argument("--latents", help="folder of latent shards (written by --extract; read by training)")
parser.add_argument("--method", default="twinflow", choices=METHODS)
parser.add_argument("--model", default="B/2", choices=MODELS)
parser.add_argument("--depth", type=int, help="override the model's depth (tests use tiny models)")
parser.add_argument("--hidden", type=int, help="override the hidden size")
parser.add_argument("--heads", type=int, help="override the number of heads")
parser.add_argument("--train-steps", type=int, default=400_000)
parser.add_argument("--batch", type=int, default=256, help="global batch (split across DDP ranks)")
parser.add_argument("--lr", type=float, default=1e-4)
parser.add_argument("--ema", type=float, default=0.9999, help="decay of the EMA sampled from (grids, FID)")
parser.add_argument("--target-ema", type=float, default=0.99,
                    help="decay of the EMA that builds the training targets (the authors: 0.99)")
parser.add_argument("--kappa", type=float, default=0.5, help="enhanced-target guidance κ (0: off)")
parser.add_argument("--order", type=int, default=2, help="N of the RCGM consistency target")
parser.add_argument("--label-dropout", type=float, default=0.1, help="share of labels replaced by the null class")
parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
parser.add_argument("--compile", action="store_true", help="torch.compile the training model")
parser.add_argument("--out", default=None, help="default: out/imagenet_{method} (--sample / --fid: eval/ beside --ckpt)")
parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
parser.add_argument("--ckpt-every", type=int, default=10_000)
parser.add_argument("--log-every", type=int, default=100)
parser.add_argument("--sample", action="store_true", help="decode grids from --ckpt")
parser.add_argument("--classes", default="207,360,387,974,88,979,417,279", help="--sample: one grid row each")
parser.add_argument("--per-class", type=int, default=8, help="--sample: images per class")
parser.add_argument("--many-steps", type=int, default=32, help="NFE of the 'many steps' grid")
parser.add_argument("--fid", action="store_true", help="FID of --ckpt's EMA at --nfe against --fid-ref")
parser.add_argument("--fid-ref", help="ADM's reference .npz: its mu/sigma if it has them, else arr_0 (N, H, W, 3) uint8")
parser.add_argument("--ckpt", help="checkpoint for --sample / --fid")
parser.add_argument("--nfe", type=int, default=1, help="--fid: NFE of the samples")
parser.add_argument("--num-fid", type=int, default=50_000, help="--fid: how many samples")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def parse_args(argv=None):
    args = parser.parse_args(argv)
    unset = argparse.Namespace(**{key: None for key in vars(args)})  # (--resume: what was given again)
    given_again = vars(parser.parse_known_args(argv, unset)[0])
    args.given = sorted(key for key, value in given_again.items() if value is not None)
    if (args.sample or args.fid) and args.ckpt and not args.out:  # into eval/ beside the checkpoint,
        args.out = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval")  # not over its run's files
    args.out = args.out or f"out/imagenet_{args.method}"
    depth, hidden, heads = MODELS[args.model]
    pick = lambda given, preset: preset if given is None else given  # (0 is refused below, not replaced)
    args.depth, args.hidden, args.heads = pick(args.depth, depth), pick(args.hidden, hidden), pick(args.heads, heads)
    if args.extract and not args.image_dir:
        parser.error("--extract needs --image-dir")
    if not (args.sample or args.fid) and not args.latents:
        parser.error("--latents DIR is needed to train (and to --extract into)")
    if (args.sample or args.fid) and not args.ckpt:
        parser.error("--sample and --fid need --ckpt PATH")
    classes = str(args.classes)
    try:
        args.classes = [int(c) for c in classes.split(",")]
        assert min(args.classes) >= 0
    except (ValueError, AssertionError):
        parser.error(f"--classes: comma-separated class indices, like 207,360; got {classes!r}")
    if args.resume:  # continue the run with its own settings, but for the flags given again (checked below)
        path = os.path.join(args.out, "checkpoint.pt")
        resume_settings(args, load_checkpoint(path, "--resume", mmap=True)["config"], path)
    if min(args.depth, args.hidden, args.heads) < 1:
        parser.error(f"--depth, --hidden and --heads must be at least 1, got {args.depth}, {args.hidden}, {args.heads}")
    if args.hidden % 4 or args.hidden % args.heads or (args.hidden // args.heads) % 2:
        parser.error(f"--hidden {args.hidden}: a multiple of 4 that splits into --heads {args.heads} heads of even size")
    if args.fid and not args.fid_ref:
        parser.error("--fid needs --fid-ref (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    if args.num_fid < 2:
        parser.error(f"--num-fid must be at least 2 (a Fréchet distance needs a covariance), got {args.num_fid}")
    for name in ("train_steps", "batch", "num_fid", "nfe", "many_steps", "ckpt_every", "log_every", "per_class",
                 "shard_size", "resolution", "order"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.resolution % 16:  # found here, not at the first training step after a whole extraction
        parser.error(f"--resolution {args.resolution}: must be a multiple of 16 (the VAE downsamples 8×, "
                     f"the DiT's patches are 2×2 latents)")
    if not (0 <= args.ema < 1 and 0 <= args.target_ema < 1 and 0 <= args.label_dropout < 1):
        parser.error(f"--ema, --target-ema and --label-dropout must be in [0, 1), got {args.ema}, "
                     f"{args.target_ema} and {args.label_dropout}")
    if args.many_steps in (1, 2, 4):  # the many-step column would overwrite the jumps' column of that NFE
        parser.error(f"--many-steps {args.many_steps}: 1, 2 and 4 NFE have columns of their own; pick another")
    if args.lr <= 0 or args.clip <= 0:  # (a clip ≤ 0 zeroes or flips every gradient)
        parser.error(f"--lr and --clip must be > 0, got {args.lr} and {args.clip}")
    training = not (args.sample or args.fid or args.extract)
    if training and not args.resume and os.path.exists(os.path.join(args.out, "checkpoint.pt")):
        parser.error(f"--out {args.out} already holds a run's checkpoint: add --resume to continue it, "
                     f"or pick another --out (a new run would overwrite it)")
    if args.kappa and not args.label_dropout and not (args.sample or args.fid or args.extract):
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
    # An hour, not NCCL's 10 minutes: at --extract's last barrier a rank may wait for a whole shard.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


# ----------------------------------------------------------------------------------------------
# Stage 1: images → VAE latents, in shards
# ----------------------------------------------------------------------------------------------
def load_vae(name, device):
    from diffusers import AutoencoderKL  # only the stages that touch pixels need diffusers

    try:
        vae = AutoencoderKL.from_pretrained(name)
    except Exception as e:  # offline, a typo, or not a diffusers folder
        raise SystemExit(f"error: --vae {name}: cannot load an AutoencoderKL ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})")
    return vae.to(device).eval().requires_grad_(False)


def center_crop(resolution):
    """Resize the short side to `resolution`, crop the centre, scale to [−1, 1] (ADM / DiT)."""
    return torchvision.transforms.Compose([
        torchvision.transforms.Resize(resolution, interpolation=torchvision.transforms.InterpolationMode.BICUBIC),
        torchvision.transforms.CenterCrop(resolution), torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.5] * 3, [0.5] * 3)])


@torch.no_grad()
def extract(args, rank, world, device):
    if not os.path.isdir(args.image_dir):
        raise SystemExit(f"error: --image-dir {args.image_dir}: no such folder")
    try:
        dataset = torchvision.datasets.ImageFolder(args.image_dir, transform=center_crop(args.resolution))
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: --image-dir {args.image_dir}: not an ImageFolder ({e})")
    vae = load_vae(args.vae, device)
    os.makedirs(args.latents, exist_ok=True)
    settings = {"vae": args.vae, "resolution": args.resolution, "flip_copies": args.flip_copies,
                "shard_size": args.shard_size, "images": len(dataset)}
    manifest = os.path.join(args.latents, "extract.json")  # a resumed run must not mix shard layouts
    if os.path.exists(manifest) and json.load(open(manifest)) != settings:
        raise SystemExit(f"error: --latents {args.latents}: holds shards made with {json.load(open(manifest))}; "
                         f"use the same settings to resume, or a new folder")
    if rank == 0:
        with open(manifest + ".tmp", "w") as f:
            json.dump(settings, f)
        os.replace(manifest + ".tmp", manifest)
    shards = range(math.ceil(len(dataset) / args.shard_size))
    missing = [k for k in shards if not os.path.exists(os.path.join(args.latents, f"shard_{k:05d}.pt"))]
    if world > 1:  # every rank has listed the same missing shards before any is written
        dist.barrier()
    todo = missing[rank::world]  # resumable, and the work stays even across ranks (also on resume)
    for k in tqdm(todo, desc=f"rank {rank} shards", disable=rank != 0):
        torch.manual_seed(args.seed + k)  # the posterior's draws: a shard is the same if extracted again
        part = torch.utils.data.Subset(dataset, range(k * args.shard_size, min((k + 1) * args.shard_size, len(dataset))))
        latents, labels = [], []
        for x, y in torch.utils.data.DataLoader(part, batch_size=64, num_workers=args.workers):
            views = [x, x.flip(3)] if args.flip_copies else [x]
            for view in views:
                posterior = vae.encode(view.to(device)).latent_dist
                latents.append((posterior.sample() * vae.config.scaling_factor).half().cpu())
                labels.append(y)
        path = os.path.join(args.latents, f"shard_{k:05d}.pt")
        torch.save({"latents": torch.cat(latents), "labels": torch.cat(labels)}, path + ".tmp")
        os.replace(path + ".tmp", path)
    if world > 1:
        dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        meta = {"vae": args.vae, "scaling_factor": vae.config.scaling_factor, "resolution": args.resolution,
                "num_classes": len(dataset.classes), "classes": dataset.classes, "images": len(dataset),
                "flip_copies": args.flip_copies, "shards": len(shards)}
        with open(os.path.join(args.latents, "meta.json.tmp"), "w") as f:  # meta.json marks a finished
            json.dump(meta, f, indent=2)                                       # extraction: write it whole
        os.replace(os.path.join(args.latents, "meta.json.tmp"), os.path.join(args.latents, "meta.json"))
        print(f"wrote {len(shards)} shards of latents for {len(dataset)} images to {args.latents}")


def load_latents(folder):
    """All shards, in order, memory-mapped → (dataset, meta); dataset[i] = (latent float16 (C, h, w), label).
    Nothing is copied: the pages come from disk when a batch first touches them, and the ranks share them."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta_path):
        raise SystemExit(f"error: --latents {folder}: no meta.json; run --extract first")
    try:
        meta = json.load(open(meta_path))
        expected = meta["shards"]
    except (ValueError, KeyError) as e:
        raise SystemExit(f"error: {meta_path}: unreadable ({type(e).__name__}); run --extract again")
    paths = sorted(glob.glob(os.path.join(folder, "shard_*.pt")))
    if len(paths) != expected:
        raise SystemExit(f"error: --latents {folder}: {len(paths)} of {expected} shards; finish --extract")
    shards = []
    for path in paths:
        try:
            shards.append(torch.load(path, mmap=True))
        except Exception as e:
            raise SystemExit(f"error: {path}: unreadable ({type(e).__name__}: {e}); if it is corrupt, "
                             f"delete it and run --extract again")
    data = torch.utils.data.ConcatDataset([torch.utils.data.TensorDataset(s["latents"], s["labels"]) for s in shards])
    return data, meta


# ----------------------------------------------------------------------------------------------
# Model: a DiT/SiT-style transformer, F(x_t, t, tt, y) → a velocity
# ----------------------------------------------------------------------------------------------
def sincos_2d(dim, size):
    """Fixed 2D sine-cosine position embedding, (size², dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    angles = [c.flatten()[:, None] * omega for c in (ys, xs)]
    return torch.cat([torch.cat([a.sin(), a.cos()], 1) for a in angles], 1)


class TimestepEmbedder(nn.Module):
    """t → [cos(1000·t·ω), sin(1000·t·ω)] → MLP. sin is odd: the SIGN of t (real or fake) survives."""

    def __init__(self, hidden, frequencies=256):
        super().__init__()
        self.register_buffer("omega", torch.exp(-math.log(10000) * torch.arange(frequencies // 2) / (frequencies // 2)))
        self.mlp = nn.Sequential(nn.Linear(frequencies, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        angles = 1000 * t[:, None].float() * self.omega
        return self.mlp(torch.cat([angles.cos(), angles.sin()], 1))


class Block(nn.Module):
    """Pre-norm attention + MLP, both modulated by the conditioning c (adaLN-Zero: starts as identity)."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"), nn.Linear(4 * hidden, hidden))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.modulation[1].weight), nn.init.zeros_(self.modulation[1].bias)

    def attention(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(6, -1)
        x = x + gate1 * self.attention(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class DiT(nn.Module):
    """Patchify (2×2) → blocks → unpatchify. Conditioning c = emb_t(t) + emb_tt(tt)·(t − tt) + emb(y):
    emb_tt starts as a copy of emb_t and is scaled by the jump length, so at tt = t the network is
    exactly a flow model and a pretrained DiT/SiT checkpoint can be the starting point."""

    def __init__(self, depth=12, hidden=768, heads=12, channels=4, size=32, patch=2, num_classes=1000):
        super().__init__()
        self.channels, self.patch, self.size, self.null_class = channels, patch, size, num_classes
        self.embed = nn.Conv2d(channels, hidden, patch, stride=patch)
        self.register_buffer("position", sincos_2d(hidden, size // patch)[None])
        self.t_embedder, self.tt_embedder = TimestepEmbedder(hidden), TimestepEmbedder(hidden)
        self.tt_embedder.load_state_dict(self.t_embedder.state_dict())  # the authors' initialisation
        self.label = nn.Embedding(num_classes + 1, hidden)  # class `num_classes` is the null class
        nn.init.normal_(self.label.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final = nn.Linear(hidden, patch * patch * channels)
        for layer in (self.final_modulation[1], self.final):
            nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)

    def forward(self, x_t, t, tt, y):
        c = self.t_embedder(t) + self.tt_embedder(tt) * (t - tt)[:, None] + self.label(y)
        h = self.embed(x_t).flatten(2).transpose(1, 2) + self.position
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(c)[:, None].chunk(2, -1)
        h = self.final(self.final_norm(h) * (1 + scale) + shift)  # (B, L, p·p·C)
        n, p = self.size // self.patch, self.patch
        h = h.reshape(-1, n, n, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(-1, self.channels, self.size, self.size)


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic (write, then rename), with everything an exact resume needs
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path, model, ema, target_ema, opt, step, logs, args, meta, seconds):
    device = next(model.parameters()).device
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "target_ema": target_ema.state_dict(),
             "opt": opt.state_dict(), "step": step, "seconds": seconds,
             "logs": logs, "config": {k: v for k, v in vars(args).items()}, "meta": meta,
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
        missing = {"model", "ema", "opt", "step", "logs", "config", "rng", "meta"} - set(state)
    except Exception as e:
        raise SystemExit(f"error: {flag} {path}: not a readable checkpoint ({type(e).__name__}: {e})")
    if missing:
        raise SystemExit(f"error: {flag} {path}: not a checkpoint of this script (missing {sorted(missing)})")
    return state


ARCHITECTURE = ("depth", "hidden", "heads")
# What describes this invocation, not the run: --resume never takes these from the checkpoint.
THIS_INVOCATION = ("out", "resume", "device", "latents", "compile", "extract", "image_dir", "vae", "resolution",
                   "workers", "shard_size", "flip_copies", "sample", "classes", "per_class", "fid", "fid_ref", "ckpt",
                   "nfe", "num_fid", "given")


def resume_settings(args, config, path):
    """--resume continues the checkpoint's run: every setting not given on this command line takes the
    run's value (so `--resume --out DIR --latents DIR` needs nothing else). A different --method or
    model is refused; any other flag given again (a longer --train-steps, a new --lr) wins, and is reported."""
    changed = []
    for key, saved in config.items():
        if key in THIS_INVOCATION or not hasattr(args, key):
            continue
        if key not in args.given:
            setattr(args, key, saved)
        elif saved != getattr(args, key):
            if key in ("method", "model", *ARCHITECTURE):
                raise SystemExit(f"error: --resume {path}: trained with --{key.replace('_', '-')} {saved}, "
                                 f"not {getattr(args, key)}")
            changed.append(f"--{key.replace('_', '-')} {getattr(args, key)} (the run's: {saved})")
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"resume with {', '.join(changed)}")


def build_model(config, meta):
    latent = meta["resolution"] // meta["downsample"]
    return DiT(config["depth"], config["hidden"], config["heads"], meta["latent_channels"], latent,
               num_classes=meta["num_classes"])


# ----------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------
def train(args, rank, world, device):
    data, meta = load_latents(args.latents)
    latent = data[0][0]  # (C, h, w)
    meta.update(latent_channels=latent.shape[0], downsample=meta["resolution"] // latent.shape[-1])
    path = os.path.join(args.out, "checkpoint.pt")
    state = load_checkpoint(path, "--resume") if args.resume else None  # (its settings: parse_args)
    seconds_before, started = (state.get("seconds", 0.0) if state else 0.0), time.time()
    seconds = lambda: seconds_before + time.time() - started  # training time, over every --resume
    torch.manual_seed(args.seed)  # the same initial weights on every rank and for every method
    model = build_model(vars(args), meta).to(device)
    # Two EMA copies, in eval mode. The targets (RCGM's consistency target, the enhanced target) come
    # from a short one, 0.99 as the authors': a 0.9999 one averages over the last 10,000 steps, far
    # too stale. Samples and FID use the long one.
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    target_ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0)
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
    net = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    net = torch.compile(net) if args.compile else net
    per_rank = args.batch // world
    if rank == 0:
        print(f"{args.method}: DiT {args.depth}×{args.hidden}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"parameters, {len(data)} latents, world size {world}, global batch {per_rank * world}, "
              f"device {device}, from step {step}")
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
            index = torch.randint(len(data), (per_rank,))  # the data stay on the CPU; only the batch moves
            x, y = torch.utils.data.default_collate([data[i] for i in index.tolist()])
            x, y = x.to(device).float(), y.to(device)
            y = torch.where(torch.rand(per_rank, device=device) < args.label_dropout, null, y)
            # Under autocast every network call runs in bf16, the target EMA's too; common.py does the
            # arithmetic on their outputs in float32, but ρ = (t − tt)/Δt·(F − F*) scales their
            # rounding by up to 100: one more reason for its clamp.
            with autocast:
                loss, terms = training_loss(net, target_ema, x, method=args.method, cond={"y": y},
                                            null_cond={"y": null}, kappa=args.kappa, order=args.order)
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
                save_checkpoint(path, model, ema, target_ema, opt, step + 1, logs, args, meta, seconds())
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
                save_checkpoint(path, model, ema, target_ema, opt, step, logs, args, meta, seconds())
            print(f"\ninterrupted: saved step {step} to {path}; continue with --resume")
        raise SystemExit(130)
    if rank == 0 and step != saved:  # (not twice when the last step was a --ckpt-every one)
        save_checkpoint(path, model, ema, target_ema, opt, step, logs, args, meta, seconds())
    return ema, logs, meta, step, seconds()


# ----------------------------------------------------------------------------------------------
# Sample: latents from the transformer, pixels from the VAE
# ----------------------------------------------------------------------------------------------
def sampler_style(method, nfe, many_steps):
    """common.sample's style: 'mul' (plain multi-step) for flow and at --many-steps, else 'any'."""
    return "mul" if method == "flow" or nfe == many_steps else "any"  # as in the other scripts


@torch.no_grad()
def generate(model, vae, meta, method, labels, nfe, many_steps, generator, batch=64):
    """Images in [0, 1], (N, 3, H, W), class-conditional, in batches."""
    device = next(model.parameters()).device
    style = sampler_style(method, nfe, many_steps)
    out = []
    for y in labels.split(batch):
        z = torch.randn(len(y), model.channels, model.size, model.size, generator=generator).to(device)
        latents = sample(model, z, steps=nfe, style=style, cond={"y": y.to(device)})
        images = vae.decode(latents / meta["scaling_factor"]).sample
        out.append(((images.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


def write_grids(model, vae, meta, method, args):
    """grid_nfe{k}.png: one row per class in --classes, --per-class samples each."""
    if max(args.classes) >= meta["num_classes"]:
        raise SystemExit(f"error: --classes {','.join(map(str, args.classes))}: the model has "
                         f"{meta['num_classes']} classes")
    labels = torch.tensor(args.classes).repeat_interleave(args.per_class)
    for nfe in [1, 2, 4, args.many_steps]:
        images = generate(model, vae, meta, method, labels, nfe, args.many_steps,
                          torch.Generator().manual_seed(args.seed + 2))
        save_image(make_grid(images, nrow=args.per_class, pad_value=1), os.path.join(args.out, f"grid_nfe{nfe}.png"))


# ----------------------------------------------------------------------------------------------
# Evaluate: FID against a reference batch the user provides
# ----------------------------------------------------------------------------------------------
def fid_features():
    """2048: torchmetrics' FID Inception-v3 pool features. The tests swap in a tiny stand-in."""
    return 2048


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), in float64. tr (Σ1 Σ2)^½ = tr (Σ1^½ Σ2 Σ1^½)^½, and that
    matrix is symmetric, so both square roots come from eigh: real, and no scipy. (torchmetrics has
    this only as a private helper.)"""
    mu1, sigma1, mu2, sigma2 = (a.double().cpu() for a in (mu1, sigma1, mu2, sigma2))
    w, v = torch.linalg.eigh(sigma1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T  # Σ1^½ (tiny negative eigenvalues are rounding)
    trace_sqrt = torch.linalg.eigvalsh(root1 @ sigma2 @ root1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt).item()


@torch.no_grad()
def fid(model, vae, meta, method, args, rank, world, device, batch=64):
    """--num-fid samples from the 0.9999 EMA (--ema) at --nfe, classes spread evenly over all classes, split across
    ranks, go to torchmetrics' FID as uint8 pixels (rounded, not truncated as its float path does),
    which sums the statistics over ranks. The reference is --fid-ref, ADM's npz: its mu/sigma when it has them (ADM's evaluator uses
    them, and the published numbers are against them), else every image of arr_0 (N, H, W, 3) uint8.
    → (FID, the features, the reference used)"""
    try:  # all of it checked before Inception's weights are fetched
        npz = np.load(args.fid_ref)
        precomputed = {"mu", "sigma"} <= set(npz.files)
        if precomputed:
            mu_ref, sigma_ref = torch.from_numpy(npz["mu"]), torch.from_numpy(npz["sigma"])
        else:
            images = npz["arr_0"]
            assert images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8, images.shape
    except Exception as e:
        raise SystemExit(f"error: --fid-ref {args.fid_ref}: expected an .npz with mu and sigma, or with arr_0 "
                         f"(N, H, W, 3) uint8 ({type(e).__name__}: {e})")
    feature = fid_features()
    metric_device = torch.device("cpu") if device.type == "mps" else device  # float64 statistics: not on MPS
    metric = FrechetInceptionDistance(feature=feature).to(metric_device)  # takes uint8 pixels
    # ADM computed mu/sigma with TF's Inception graph (inception-2015-12-05). torchmetrics' default
    # extractor is torch-fidelity's port of those weights, with TF-1 resizing; torch-fidelity documents
    # values that match the reference implementations, so the two features are comparable (not bit-exact).
    dim = metric.fake_features_sum.numel()
    if precomputed:
        if mu_ref.shape != (dim,) or sigma_ref.shape != (dim, dim):
            raise SystemExit(f"error: --fid-ref {args.fid_ref}: mu {tuple(mu_ref.shape)} and sigma "
                             f"{tuple(sigma_ref.shape)} do not fit {dim} features")
        reference = "npz mu/sigma (precomputed statistics)"
    else:
        for x in torch.from_numpy(images[rank::world]).split(batch):
            metric.update(x.permute(0, 3, 1, 2).to(metric_device), real=True)
        reference = f"npz arr_0 images ({len(images)})"
    labels = torch.arange(rank, args.num_fid, world) % meta["num_classes"]  # this rank's share
    generator = torch.Generator().manual_seed(args.seed + 10_000 * rank)
    for y in tqdm(labels.split(batch), desc=f"FID {args.nfe} NFE", disable=rank != 0):
        images = generate(model, vae, meta, method, y, args.nfe, args.many_steps, generator, batch)
        metric.update((images * 255).round().clamp(0, 255).to(torch.uint8).to(metric_device), real=False)
    if precomputed:  # the fake half of the metric's statistics, against mu/sigma
        with metric.sync_context():  # summed over ranks, as compute() does
            n = metric.fake_features_num_samples
            mu = metric.fake_features_sum / n
            sigma = (metric.fake_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
        value = frechet_distance(mu, sigma, mu_ref, sigma_ref)
    else:
        value = metric.compute().item()
    return value, f"Inception-v3 pool ({feature})" if feature == 2048 else type(feature).__name__, reference


# ----------------------------------------------------------------------------------------------
# Main: --extract, or train → save, or --sample / --fid a checkpoint
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    try:
        if args.extract:
            return extract(args, rank, world, device)
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
        if args.sample or args.fid:
            state = load_checkpoint(args.ckpt, "--ckpt")
            meta = state["meta"]
            try:  # a checkpoint of another model, or of other data, does not fit
                model = build_model(state["config"], meta).to(device)
                model.load_state_dict(state["ema"])
            except (KeyError, TypeError, RuntimeError) as e:
                raise SystemExit(f"error: --ckpt {args.ckpt}: does not fit this script's model "
                                 f"({type(e).__name__}: {str(e).splitlines()[0]})")
            model.eval().requires_grad_(False)
            vae = load_vae(meta["vae"], device)
            method, result = state["config"]["method"], None
            if args.sample and rank == 0:
                write_grids(model, vae, meta, method, args)
                print(f"wrote {args.out}/grid_nfe*.png")
            if args.fid:
                value, features, reference = fid(model, vae, meta, method, args, rank, world, device)
                result = {"fid": value, "nfe": args.nfe, "style": sampler_style(method, args.nfe, args.many_steps),
                          "num_samples": args.num_fid, "weights": f"EMA {state['config']['ema']}", "seed": args.seed,
                          "reference": args.fid_ref,
                          "reference_statistics": reference, "features": features,
                          "library": f"torchmetrics {torchmetrics.__version__}", "checkpoint": args.ckpt,
                          "step": state["step"], "method": method, "world_size": world}
                if rank == 0:
                    write_json(os.path.join(args.out, "fid.json"), result)
                    print(f"FID {value:.3f} ({args.num_fid} samples, {args.nfe} NFE, EMA) → {args.out}/fid.json")
            return result

        if args.batch // world < 4:
            parser.error(f"--batch {args.batch} over {world} rank(s): each needs at least 4 (twinflow splits in 4)")
        ema, logs, meta, step, seconds = train(args, rank, world, device)
        if rank != 0:
            return None
        result = {"method": args.method, "train_seconds": round(seconds, 1), "steps": step,
                  "world_size": world, "global_batch": args.batch // world * world, "device": str(device),
                  "parameters": sum(p.numel() for p in ema.parameters()), "latents": meta, "config": vars(args)}
        write_json(os.path.join(args.out, "train.json"), result)
        print(f"wrote {args.out}/ ({result['train_seconds']:.0f} s)")
        return result
    finally:
        if world > 1:
            dist.destroy_process_group()


def write_json(path, result):
    """Atomically: a crash mid-write (after a long FID) keeps the last complete file."""
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
