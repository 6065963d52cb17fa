"""TwinFlow at scale: full-parameter training of Qwen-Image (20.4B) for 1-NFE text-to-image, FSDP2.

The skeleton of imagenet_twinflow.py; what changes at 20B: the network is the pretrained diffusers
QwenImageTransformer2DModel plus a `tt` embedder (a copy of its `t` embedder, so training starts at
exactly the pretrained model), captions and images are encoded once (--precompute) so training holds
only the transformer, every block is sharded across GPUs with FSDP2 (`fully_shard`), blocks recompute
their activations in backward, and checkpoints are sharded (torch.distributed.checkpoint).

    # 0. what fits where, before renting anything (fetches only config.json; no GPU)
    python scale_qwen_image.py --plan 8
    # 1. encode captions (Qwen2.5-VL) and images (the Qwen-Image VAE) once; one shard per rank at a time
    torchrun --nproc_per_node 8 scale_qwen_image.py --precompute --data /data/pairs.jsonl --cache /data/qwen_cache
    # 2. train, 8 GPUs (--batch is global: 4 per GPU, the authors' recipe)
    torchrun --nproc_per_node 8 scale_qwen_image.py --cache /data/qwen_cache --out out/qwen_twinflow
    #    ... or 4 nodes × 8 GPUs (run on every node; MASTER = the first node's address)
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $MASTER:29500 \\
        scale_qwen_image.py --cache /data/qwen_cache --out out/qwen_twinflow --batch 128
    # 3. consolidated weights (one process, CPU is enough), then 1, 2, 4-NFE images
    python scale_qwen_image.py --export out/qwen_twinflow/export --out out/qwen_twinflow
    python scale_qwen_image.py --sample --ckpt out/qwen_twinflow/export --prompts "a red fox in snow|a bowl of ramen"
    # (the images go to out/qwen_twinflow/export_samples/ unless --out is given)

--data: a folder of images with captions in same-named .txt files, or a JSONL manifest of
{"image": path (relative to the manifest), "caption": text}. --cache gets shard_NNNNN.pt files of
{"latents": bf16 (n, L, 64) packed as the pipeline packs them, "text": bf16 (n, S, 3584), "text_lengths"},
null.pt (the empty prompt: the unconditional input of the enhanced target) and meta.json.
Training writes --out/checkpoints/step_NNNNNNN/ (sharded model, optimizer, EMA if any, per-rank RNG,
train_state.json); --export writes a diffusers folder `transformer/` that QwenImagePipeline loads:
    transformer = TwinFlowQwenImageTransformer.from_pretrained(EXPORT, subfolder="transformer")
    pipe = QwenImagePipeline.from_pretrained("Qwen/Qwen-Image", transformer=transformer)
(`pipe(...)` then runs the usual many-step sampler: without a target time, tt = t.)
Ctrl-C or SIGTERM finishes the step and saves. torchrun sends SIGKILL 30 s after it forwards a
SIGTERM, and a 20B save takes minutes: launch with `torchrun --shutdown-timeout 1800 ...` (and on
Slurm, ask for the signal early: `sbatch --signal=TERM@900`).
"""
import argparse
import copy
import functools
import glob
import json
import math
import os
import shutil
import signal
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torchvision
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from common import sample, training_loss, update_ema

# diffusers (and transformers, which its Qwen-Image pipeline imports) are needed by every stage
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
METHODS = ("flow", "rcgm", "twinflow")
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="Qwen/Qwen-Image", help="hub id or local diffusers pipeline folder")
parser.add_argument("--plan", type=int, metavar="N_GPUS",
                    help="print the memory budget per GPU for N GPUs sharing the global --batch, and exit")
parser.add_argument("--gpu-memory", type=float, default=80, help="--plan: GiB per GPU")
parser.add_argument("--precompute", action="store_true", help="stage 1: encode --data into --cache")
parser.add_argument("--data", help="image folder with .txt captions, or a .jsonl manifest")
parser.add_argument("--cache", help="folder of precomputed shards (written by --precompute)")
parser.add_argument("--resolution", type=int, default=1024, help="square images, a multiple of 16")
parser.add_argument("--max-text-len", type=int, default=512, help="caption tokens kept (the pipeline's default)")
parser.add_argument("--shard-size", type=int, default=1000, help="pairs per shard")
parser.add_argument("--encode-batch", type=int, default=8, help="--precompute: pairs per encoder call")
parser.add_argument("--method", default="twinflow", choices=METHODS)
parser.add_argument("--train-steps", type=int, default=10_000)
parser.add_argument("--batch", type=int, default=32, help="global batch (split across ranks)")
parser.add_argument("--lr", type=float, default=1e-5)
parser.add_argument("--ema", type=float, default=0.0,
                    help="EMA decay; 0 (the authors' 20B setting): no copy, the model builds its own targets")
parser.add_argument("--kappa", type=float, default=0.8,
                    help="enhanced-target guidance κ (0: off); 0.8 in the authors' SD3.5 and Qwen-Image configs")
parser.add_argument("--rectify-weight", type=float, default=0.5, help="L_rectify's weight (the authors': 0.5)")
parser.add_argument("--order", type=int, default=2, help="N of the RCGM consistency target")
parser.add_argument("--text-dropout", type=float, default=0.1, help="share of captions replaced by the empty prompt")
parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bf16 compute (FSDP2 mixed precision under torchrun; else autocast on CUDA)")
parser.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
                    help="recompute each block's activations in backward")
parser.add_argument("--out", default=None,
                    help="the run's folder (default: out/qwen_{method}); --sample: default {--ckpt}_samples")
parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
parser.add_argument("--ckpt-every", type=int, default=500)
parser.add_argument("--keep", type=int, default=2, help="checkpoints kept (each is 12 bytes/parameter, 16 with --ema)")
parser.add_argument("--log-every", type=int, default=10)
parser.add_argument("--export", metavar="DIR", help="write --out's newest checkpoint as a diffusers folder")
parser.add_argument("--sample", action="store_true", help="images from the exported transformer in --ckpt")
parser.add_argument("--ckpt", help="--sample: an --export folder")
parser.add_argument("--prompts", default="a red fox in fresh snow|a bowl of ramen on a wooden table",
                    help="--sample: prompts separated by |")
parser.add_argument("--nfe", default="1,2,4", help="--sample: the NFEs of the TwinFlow sampler")
parser.add_argument("--pipeline-steps", type=int, default=50,
                    help="--sample: also the pipeline's own sampler, this many steps, no CFG (0: skip)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def parse_args(argv=None):
    args = parser.parse_args(argv)
    unset = argparse.Namespace(**{key: None for key in vars(args)})  # (--resume: what was given again)
    given_again = vars(parser.parse_known_args(argv, unset)[0])
    args.given = sorted(key for key, value in given_again.items() if value is not None)
    if args.sample and args.ckpt and not args.out:  # beside the export, named after it: not into a run
        args.out = os.path.abspath(args.ckpt).rstrip(os.sep) + "_samples"
    args.out = args.out or f"out/qwen_{args.method}"
    if args.resume:  # continue the run with its own settings, but for the flags given again (checked below)
        found = checkpoint_dirs(args.out)
        if not found:
            raise SystemExit(f"error: --resume: no checkpoint in {args.out}/checkpoints")
        resume_settings(args, read_train_state(found[-1])["config"], found[-1])
    if args.resolution % 16:
        parser.error(f"--resolution {args.resolution}: must be a multiple of 16 (VAE 8× and 2×2 patches)")
    if args.precompute and not (args.data and args.cache):
        parser.error("--precompute needs --data and --cache")
    if args.sample and not args.ckpt:
        parser.error("--sample needs --ckpt EXPORT_DIR (written by --export)")
    if args.plan is not None and args.plan < 1:
        parser.error(f"--plan {args.plan}: the number of GPUs must be at least 1")
    if not (args.plan or args.precompute or args.export or args.sample or args.cache):
        parser.error("training needs --cache (written by --precompute)")
    for name in ("train_steps", "batch", "ckpt_every", "log_every", "shard_size", "encode_batch", "keep",
                 "max_text_len", "order"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not (0 <= args.ema < 1 and 0 <= args.text_dropout < 1):
        parser.error(f"--ema and --text-dropout must be in [0, 1), got {args.ema} and {args.text_dropout}")
    training = not (args.plan or args.precompute or args.export or args.sample)
    if training and not args.resume and checkpoint_dirs(args.out):  # its checkpoints would sort among
        parser.error(f"--out {args.out} already holds a run's checkpoints: add --resume to continue it, "  # ours
                     f"or pick another --out (the --keep clean-up would delete the new run's)")
    if args.lr <= 0 or args.clip <= 0 or args.rectify_weight < 0 or args.pipeline_steps < 0:
        parser.error(f"--lr and --clip must be > 0, --rectify-weight and --pipeline-steps ≥ 0; got {args.lr}, "
                     f"{args.clip}, {args.rectify_weight}, {args.pipeline_steps}")
    if args.kappa and not args.text_dropout and training:
        parser.error("--kappa needs --text-dropout > 0: the enhanced target reads the empty prompt, "
                     "which only dropout trains")
    if not all(k.strip().isdigit() and int(k) >= 1 for k in args.nfe.split(",")):
        parser.error(f"--nfe {args.nfe}: comma-separated step counts of at least 1, e.g. 1,2,4")
    if args.sample and not any(p.strip() for p in args.prompts.split("|")):
        parser.error("--prompts: give at least one prompt (separate several with |)")
    return args


def pick_device(name, local_rank=0):
    if name != "auto":
        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available.get(name.split(":")[0], False):
            raise SystemExit(f"error: --device {name}: not available here (try auto, cpu, cuda or mps)")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_distributed(args):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK, and then training is FSDP2, even on one GPU; plain
    `python` runs one process without sharding. → (rank, world, device)"""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(args.device)
    world = int(os.environ["WORLD_SIZE"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(args.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # An hour, not NCCL's 10 minutes: saving 12 bytes per parameter or encoding a shard takes long.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    return rank, world, device


# ----------------------------------------------------------------------------------------------
# Stage 1: image–caption pairs → packed VAE latents and text embeddings, in shards
# ----------------------------------------------------------------------------------------------
IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp")


def read_pairs(path):
    """→ [(image path, caption)] from a folder (captions in same-named .txt files) or a JSONL manifest."""
    if path.endswith(".jsonl"):
        if not os.path.isfile(path):
            raise SystemExit(f"error: --data {path}: no such file")
        pairs = []
        for number, line in enumerate(open(path), 1):
            if line.strip():
                try:
                    item = json.loads(line)
                    pairs.append((os.path.join(os.path.dirname(path), item["image"]), str(item["caption"])))
                except (ValueError, KeyError, TypeError) as e:
                    raise SystemExit(f"error: --data {path}: line {number} is not "
                                     f'{{"image": ..., "caption": ...}} ({type(e).__name__}: {e})')
    elif os.path.isdir(path):
        images = sorted(p for p in glob.glob(os.path.join(path, "*")) if p.lower().endswith(IMAGE_TYPES))
        pairs = []
        for image in images:
            caption = os.path.splitext(image)[0] + ".txt"
            if not os.path.isfile(caption):
                raise SystemExit(f"error: --data {path}: {os.path.basename(image)} has no caption file "
                                 f"{os.path.basename(caption)}")
            pairs.append((image, open(caption).read().strip()))
    else:
        raise SystemExit(f"error: --data {path}: neither a folder nor a .jsonl file")
    if not pairs:
        raise SystemExit(f"error: --data {path}: no image–caption pairs found")
    return pairs


def load_text_encoder(name, device, max_text_len):
    """captions → (embeddings (B, S, 3584), mask (B, S)) with Qwen-Image's own encode_prompt
    (Qwen2.5-VL, its prompt template, the template tokens dropped). The tests swap in a stand-in."""
    try:
        pipe = QwenImagePipeline.from_pretrained(name, transformer=None, vae=None, dtype=torch.bfloat16)
    except Exception as e:
        raise SystemExit(f"error: --model {name}: cannot load the text encoder ({type(e).__name__})")
    pipe.text_encoder.to(device)

    def encode(captions):
        embeddings, mask = pipe.encode_prompt(captions, device=device, max_sequence_length=max_text_len)
        return embeddings, torch.ones(embeddings.shape[:2], dtype=torch.long) if mask is None else mask
    return encode


def load_vae(name, device):
    try:
        vae = AutoencoderKLQwenImage.from_pretrained(name, subfolder="vae")
    except Exception as e:
        raise SystemExit(f"error: --model {name}: cannot load the Qwen-Image VAE ({type(e).__name__})")
    return vae.to(device).eval().requires_grad_(False)


def latent_statistics(vae, like):
    """The per-channel mean and std the pipeline normalises latents with, shaped (1, C, 1, 1, 1)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    return (torch.tensor(vae.config.latents_mean).view(shape).to(like),
            torch.tensor(vae.config.latents_std).view(shape).to(like))


@torch.no_grad()
def encode_images(vae, images):
    """(B, 3, H, W) in [−1, 1] → packed latents (B, H/16·W/16, 64), exactly as the pipeline lays them out."""
    latents = vae.encode(images[:, :, None].to(vae.dtype)).latent_dist.mode()  # (B, 16, 1, H/8, W/8)
    mean, std = latent_statistics(vae, latents)
    latents = (latents - mean) / std
    B, C, _, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents, B, C, h, w)


@torch.no_grad()
def decode_latents(vae, latents, resolution, vae_scale_factor=8):
    """Packed latents → images (B, 3, H, W) in [0, 1]: the pipeline's decoding."""
    latents = QwenImagePipeline._unpack_latents(latents, resolution, resolution, vae_scale_factor).to(vae.dtype)
    mean, std = latent_statistics(vae, latents)
    images = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
    return ((images.float() + 1) / 2).clamp(0, 1)


def center_crop(resolution):
    """Resize the short side to `resolution`, crop the centre, scale to [−1, 1]."""
    return torchvision.transforms.Compose([
        torchvision.transforms.Resize(resolution, interpolation=torchvision.transforms.InterpolationMode.BICUBIC),
        torchvision.transforms.CenterCrop(resolution), torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.5] * 3, [0.5] * 3)])


def save_atomic(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-write leaves no half-written file under the real name


@torch.no_grad()
def precompute(args, rank, world, device):
    from PIL import Image

    pairs = read_pairs(args.data)
    os.makedirs(args.cache, exist_ok=True)
    settings = {"model": args.model, "resolution": args.resolution, "max_text_len": args.max_text_len,
                "shard_size": args.shard_size, "pairs": len(pairs)}
    manifest = os.path.join(args.cache, "precompute.json")  # a resumed run must not mix shard layouts
    if os.path.exists(manifest) and json.load(open(manifest)) != settings:
        raise SystemExit(f"error: --cache {args.cache}: holds shards made with {json.load(open(manifest))}; "
                         f"use the same settings to resume, or a new folder")
    if rank == 0:
        with open(manifest + ".tmp", "w") as f:
            json.dump(settings, f)
        os.replace(manifest + ".tmp", manifest)
    vae, encode_text = load_vae(args.model, device), load_text_encoder(args.model, device, args.max_text_len)
    transform = center_crop(args.resolution)
    shards = range(math.ceil(len(pairs) / args.shard_size))
    if world > 1:  # (rank 0 wrote the manifest)
        dist.barrier()
    missing = [k for k in shards if not os.path.exists(os.path.join(args.cache, f"shard_{k:05d}.pt"))]
    if world > 1:  # every rank has listed the same missing shards before any is written
        dist.barrier()
    todo = missing[rank::world]  # resumable, and the work stays even across ranks
    for k in tqdm(todo, desc=f"rank {rank} shards", disable=rank != 0):
        part = pairs[k * args.shard_size:(k + 1) * args.shard_size]
        latents, texts = [], []
        for i in range(0, len(part), args.encode_batch):
            batch = part[i:i + args.encode_batch]
            try:
                images = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in batch])
            except OSError as e:
                raise SystemExit(f"error: --data {args.data}: cannot read an image ({e})")
            latents.append(encode_images(vae, images.to(device)).to(torch.bfloat16).cpu())
            embeddings, mask = encode_text([caption for _, caption in batch])
            texts += [e[m.bool()].to(torch.bfloat16).cpu() for e, m in zip(embeddings, mask.to(embeddings.device))]
        lengths = torch.tensor([len(t) for t in texts])
        padded = torch.zeros(len(texts), int(lengths.max()), texts[0].shape[-1], dtype=torch.bfloat16)
        for row, t in zip(padded, texts):
            row[:len(t)] = t
        save_atomic({"latents": torch.cat(latents), "text": padded, "text_lengths": lengths},
                    os.path.join(args.cache, f"shard_{k:05d}.pt"))
    if rank == 0:  # the unconditional input: the empty prompt, as encoded by the same encoder
        embeddings, mask = encode_text([""])
        save_atomic({"text": embeddings[0][mask[0].bool()].to(torch.bfloat16).cpu()},
                    os.path.join(args.cache, "null.pt"))
    if world > 1:
        dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        meta = {**settings, "shards": len(shards), "grid": [args.resolution // 16] * 2}
        with open(os.path.join(args.cache, "meta.json.tmp"), "w") as f:  # meta.json marks a finished
            json.dump(meta, f, indent=2)                                     # --precompute: write it whole
        os.replace(os.path.join(args.cache, "meta.json.tmp"), os.path.join(args.cache, "meta.json"))
        print(f"wrote {len(shards)} shards for {len(pairs)} pairs to {args.cache}")


class Cache:
    """The precomputed shards, memory-mapped: a 20B run's cache is far larger than RAM, and each
    rank reads only the rows it draws."""

    def __init__(self, folder):
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            raise SystemExit(f"error: --cache {folder}: no meta.json; run --precompute first")
        try:
            self.meta = json.load(open(meta_path))
            expected = self.meta["shards"]
        except (ValueError, KeyError) as e:
            raise SystemExit(f"error: {meta_path}: unreadable ({type(e).__name__}: {e}); run --precompute again")
        paths = sorted(glob.glob(os.path.join(folder, "shard_*.pt")))
        if len(paths) != expected:
            raise SystemExit(f"error: --cache {folder}: {len(paths)} of {expected} shards; finish --precompute")
        try:
            self.shards = [torch.load(p, mmap=True) for p in paths]
            self.null = torch.load(os.path.join(folder, "null.pt"))["text"]
        except Exception as e:
            raise SystemExit(f"error: --cache {folder}: unreadable ({type(e).__name__}: {e})")
        self.rows = [(s, i) for s, shard in enumerate(self.shards) for i in range(len(shard["latents"]))]

    def __len__(self):
        return len(self.rows)

    def batch(self, index, drop, device):
        """Rows `index` → (latents (B, L, 64) fp32, text (B, S, D), text_mask (B, S)); where `drop`
        is True the caption is replaced by the empty prompt (so the model keeps an unconditional mode)."""
        latents, texts = [], []
        for i, dropped in zip(index.tolist(), drop.tolist()):
            shard, row = self.rows[i]
            shard = self.shards[shard]
            latents.append(shard["latents"][row])
            texts.append(self.null if dropped else shard["text"][row, :shard["text_lengths"][row]])
        text, text_mask = pad(texts)
        return torch.stack(latents).to(device).float(), text.to(device), text_mask.to(device)


def pad(texts):
    """[(S_i, D)] → (B, max S_i, D) zero-padded and the (B, max S_i) mask of real tokens."""
    length = max(len(t) for t in texts)
    text = torch.zeros(len(texts), length, texts[0].shape[-1], dtype=texts[0].dtype)
    mask = torch.zeros(len(texts), length, dtype=torch.long)
    for i, t in enumerate(texts):
        text[i, :len(t)], mask[i, :len(t)] = t, 1
    return text, mask


# ----------------------------------------------------------------------------------------------
# The model: Qwen-Image's transformer + a target-time embedder
# ----------------------------------------------------------------------------------------------
class TwinFlowQwenImageTransformer(QwenImageTransformer2DModel):
    """QwenImageTransformer2DModel with TwinFlow's target time tt:

        temb = emb(t) + emb_tt(tt)·(t − tt)

    emb_tt starts as a copy of emb (the authors' initialisation) and is scaled by the jump length, so at
    tt = t the output is exactly the pretrained model's. Time is signed (t < 0: the fake trajectory);
    the sinusoidal embedding is odd in t, so the sign reaches the network. Same config as the parent,
    so save_pretrained / from_pretrained / QwenImagePipeline work unchanged."""

    @functools.wraps(QwenImageTransformer2DModel.__init__)  # the parent's signature: diffusers reads it
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tt_embedder = copy.deepcopy(self.time_text_embed.timestep_embedder)
        self._times = None
        # The parent computes temb inside its forward; a hook adds the tt term to it, reading the times
        # that forward() stores for the length of the call (so only a call through forward() sees tt).
        self.time_text_embed.register_forward_hook(self._add_target_time)

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask=None, timestep=None,
                *args, target_timestep=None, **kwargs):
        """QwenImageTransformer2DModel.forward, plus target_timestep (B,) (default: tt = timestep).
        Pass the times in fp32. The jump t − tt is taken before anything is rounded: in bf16 (8 bits)
        the multi-step part's short jumps, tt = t(1 − 0.05u), would often round to exactly 0. So under
        FSDP2 this root casts no inputs; it casts the latents and text to its compute dtype here.
        (The times pass to the hook through self._times: one call at a time, not re-entrant.)"""
        dtype = self.img_in.weight.dtype  # bf16 under FSDP2 mixed precision (gathered weights)
        if target_timestep is not None:
            self._times = (timestep.float(), target_timestep.float())
        try:
            return super().forward(hidden_states.to(dtype), encoder_hidden_states.to(dtype), encoder_hidden_states_mask,
                                   timestep, *args, **kwargs)
        finally:
            self._times = None

    def _add_target_time(self, time_text_embed, inputs, temb):
        if self._times is None:
            return temb
        t, tt = self._times  # fp32 (the parent has rounded its own copy of t to the compute dtype)
        tt_emb = self.tt_embedder(time_text_embed.time_proj(tt).to(temb.dtype))
        return temb + tt_emb * (t - tt)[:, None].to(temb.dtype)


def load_transformer(name, dtype=torch.bfloat16):
    """from_pretrained(name, subfolder="transformer"). A plain Qwen-Image checkpoint has no tt
    embedder: it starts as a copy of the t embedder (diffusers leaves missing weights empty)."""
    try:
        model, info = TwinFlowQwenImageTransformer.from_pretrained(
            name, subfolder="transformer", dtype=dtype, output_loading_info=True)
    except Exception as e:  # offline, a typo, or not a Qwen-Image folder
        raise SystemExit(f"error: {name}: cannot load a Qwen-Image transformer ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})")
    if model.config.zero_cond_t:
        raise SystemExit(f"error: {name}: an edit model (zero_cond_t); this script trains text-to-image")
    if any(key.startswith("tt_embedder.") for key in info["missing_keys"]):
        model.tt_embedder = copy.deepcopy(model.time_text_embed.timestep_embedder)
    return model


def freeze_unused(model):
    """The last block's text stream is computed and thrown away (only image tokens reach proj_out):
    its text queries and output layers never get a gradient. Frozen, AdamW keeps no state for them and the sharded
    checkpoint's optimizer matches the trainable parameters exactly."""
    last = model.transformer_blocks[-1]
    for module in (last.attn.add_q_proj, last.attn.norm_added_q, last.attn.to_add_out, last.txt_mlp):
        module.requires_grad_(False)
    return model


def velocity_fn(transformer, grid):
    """common.py's contract F = model(x_t, t, tt, **cond) on packed latents (B, L, 64):
    cond = text (B, S, 3584) and text_mask (B, S). grid = (h, w) of the 2×2 patches."""
    def velocity(x_t, t, tt, text, text_mask):
        return transformer(hidden_states=x_t, encoder_hidden_states=text, encoder_hidden_states_mask=text_mask,
                           timestep=t, target_timestep=tt, img_shapes=[[(1, *grid)]] * len(x_t),
                           return_dict=False)[0]
    return velocity


# ----------------------------------------------------------------------------------------------
# --plan: the memory budget per GPU, before renting GPUs
# ----------------------------------------------------------------------------------------------
GiB = 2**30


def transformer_config(name):
    """The transformer's config.json (a few hundred bytes). Offline, the default model falls back to
    diffusers' defaults for the class, which are Qwen-Image's."""
    try:
        config = TwinFlowQwenImageTransformer.load_config(name, subfolder="transformer")
        return {k: v for k, v in config.items() if not k.startswith("_")}, name
    except Exception as e:
        if name != parser.get_default("model"):
            raise SystemExit(f"error: --model {name}: no transformer config ({type(e).__name__})")
        return {}, "diffusers' QwenImageTransformer2DModel defaults (= Qwen-Image; the hub was not reachable)"


def saved_bytes(config, layers, heads, text_tokens, image_side=8):
    """Bytes autograd saves for backward in one bf16 forward (one sample) of a model with this config's
    head size and text width but `layers` blocks and `heads` heads, on CPU: saved-tensor hooks, each
    storage counted once, weights excluded."""
    torch.manual_seed(0)
    model = TwinFlowQwenImageTransformer(**dict(config, num_layers=layers, num_attention_heads=heads))
    torch.nn.Module.to(model, torch.bfloat16)  # (ModelMixin.to warns about fp32-only modules: none here)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(1, image_side**2, config["in_channels"], dtype=torch.bfloat16)
    text = torch.randn(1, text_tokens, config["joint_attention_dim"], dtype=torch.bfloat16)
    t = torch.rand(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        velocity_fn(model, (image_side, image_side))(x, t, t / 2, text, torch.ones(1, text_tokens, dtype=torch.long))
    return sum(saved.values())


def activations_per_sample(config, image_tokens, text_tokens):
    """(bytes one block saves for backward, bytes saved outside the blocks), one sample. Measured with
    1 and 2 blocks, 2 and 4 heads, 8×8 or 12×12 image and 16 or 32 text tokens: every saved tensor is
    a constant plus token counts times (a constant or a multiple of the heads), so it extrapolates."""
    def split(heads, side, text):  # → (one block, outside the blocks)
        one, two = saved_bytes(config, 1, heads, text, side), saved_bytes(config, 2, heads, text, side)
        return torch.tensor([two - one, 2 * one - two], dtype=torch.float64)

    at = []
    for heads in (2, 4):
        base, more_text, more_image = split(heads, 8, 16), split(heads, 8, 32), split(heads, 12, 16)
        per_text_token, per_image_token = (more_text - base) / 16, (more_image - base) / (144 - 64)
        constant = base - 64 * per_image_token - 16 * per_text_token
        at.append(constant + per_image_token * image_tokens + per_text_token * text_tokens)
    block, root = at[0] + (config["num_attention_heads"] - 2) / 2 * (at[1] - at[0])
    return float(block), float(root)


def plan(args, config=None, verbose=True):
    """Bytes per GPU for full-parameter training of --model's transformer on --plan GPUs with FSDP2:
    fp32 sharded master weights, gradients and AdamW state (16 bytes per trainable parameter over
    N GPUs), bf16 compute, fp32 gradient reduction. Returns the rows (bytes) and the totals.
    config: a transformer config to plan for instead of --model's (the GPU benchmark's reduced one)."""
    config, source = (config, "the given config") if config is not None else transformer_config(args.model)
    with torch.device("meta"):
        model = freeze_unused(TwinFlowQwenImageTransformer(**config))
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    n_gpus, per_gpu = args.plan, max(1, args.batch // args.plan)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    block = sum(p.numel() for p in model.transformer_blocks[0].parameters())
    layers, width = config["num_layers"], model.inner_dim
    root = params - layers * block
    image_tokens, text_tokens = (args.resolution // 16) ** 2, args.max_text_len
    block_act, root_act = activations_per_sample(config, image_tokens, text_tokens)
    block_inputs = 2 * width * (image_tokens + text_tokens)  # bf16 image + text hidden states
    rows = {
        "master weights (fp32, sharded)": 4 * params / n_gpus,
        "gradients (fp32, sharded)": 4 * trainable / n_gpus,
        "AdamW state (2 × fp32, sharded)": 8 * trainable / n_gpus,
        f"EMA (fp32, sharded){'' if args.ema else ': off (--ema 0)'}": 4 * params / n_gpus if args.ema else 0,
        "gathered weights in flight (bf16: root + 2 blocks)": 2 * (root + 2 * block),
        "gathered gradients in flight (bf16 + fp32 for the reduce)": 6 * 2 * block,
    }
    act_ckpt = per_gpu * (layers * block_inputs + block_act + root_act)
    act_full = per_gpu * (layers * block_act + root_act)
    static = sum(v for k, v in rows.items() if "in flight" not in k)
    in_flight = sum(v for k, v in rows.items() if "in flight" in k)
    adam_step = 4 * trainable / n_gpus  # AdamW's foreach temporaries, while the activations are freed
    total_ckpt = static + max(in_flight + act_ckpt, adam_step)
    total_full = static + max(in_flight + act_full, adam_step)
    host = 2 * params  # per rank, while loading: the whole bf16 model (the EMA loads after it is sharded)
    result = {"parameters": params, "trainable": trainable, "block": block, "root": root, "rows": rows,
              "activations_checkpointed": act_ckpt, "activations_full": act_full, "adam_step": adam_step,
              "total_checkpointed": total_ckpt, "total_full": total_full, "host_per_rank": host,
              "config_source": source}
    if verbose:
        tt = sum(p.numel() for p in model.tt_embedder.parameters())
        print(f"Qwen-Image transformer from {source}:\n  {(params - tt) / 1e9:.2f}B pretrained parameters "
              f"({params - tt:,}) + {tt / 1e6:.1f}M for the tt embedder = {params:,}: {layers} blocks of "
              f"{block / 1e6:.1f}M + {root / 1e6:.1f}M outside them; {trainable:,} trainable")
        print(f"  {n_gpus} GPU(s), {per_gpu} image(s) per GPU at {args.resolution}² ({image_tokens} image + "
              f"{text_tokens} text tokens each)\n")
        for name, value in rows.items():
            print(f"  {name:<60} {value / GiB:8.1f} GiB")
        print(f"  {'activations, blocks recomputed (--grad-ckpt, default)':<60} {act_ckpt / GiB:8.1f} GiB")
        print(f"  {'activations, all kept (--no-grad-ckpt)':<60} {act_full / GiB:8.1f} GiB")
        print(f"  {'AdamW step temporaries (after backward, activations freed)':<60} {adam_step / GiB:8.1f} GiB")
        for name, value in (("with --grad-ckpt", total_ckpt), ("with --no-grad-ckpt", total_full)):
            verdict = "fits" if value <= 0.9 * args.gpu_memory * GiB else "does NOT fit"
            print(f"  total {name:<54} {value / GiB:8.1f} GiB: {verdict} in {args.gpu_memory:g} GiB "
                  f"(10% kept for the CUDA context and fragmentation)")
        print(f"\n  Host RAM while loading (computed, an upper bound): every rank holds the whole model in bf16, "
              f"{host / GiB:.0f} GiB per rank, times the ranks on a node.")
        if args.batch // n_gpus < 4:
            print(f"  Warning: --batch {args.batch} gives {args.batch // n_gpus} per GPU; training needs at least 4.")
        print("  Activations: autograd's saved tensors of this block measured on CPU at a small size and "
              "scaled;\n  weights and optimizer: exact counts. An estimate: the real peak also depends on "
              "the allocator.")
    return result


# ----------------------------------------------------------------------------------------------
# Sharding (FSDP2) and sharded checkpoints (torch.distributed.checkpoint)
# ----------------------------------------------------------------------------------------------
def build(args, world, device, for_ema=False):
    """The same weights on every rank (FSDP2 does not broadcast rank 0's: each rank loads them and
    keeps its shard), sharded per block, with fp32 master weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(args.seed)
    model = freeze_unused(load_transformer(args.model))  # bf16 on the host: half the RAM of fp32
    if args.grad_ckpt and not for_ema:
        model.enable_gradient_checkpointing()  # diffusers: torch.utils.checkpoint around each block
    if dist.is_initialized():  # under torchrun
        mesh = init_device_mesh(device.type, (world,))
        # bf16 all-gathers and compute, gradients reduce-scattered in fp32
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if args.bf16 else None, reduce_dtype=torch.float32)
        for block in model.transformer_blocks:  # one all-gather per block, freed after use
            fully_shard(block, mesh=mesh, mp_policy=policy)
        # The rest (embedders, img_in, proj_out). It casts no inputs: the times must reach it in fp32
        # (see TwinFlowQwenImageTransformer.forward). FSDP2 keeps a root's weights gathered after
        # forward, for the backward that follows; the EMA has no backward, so it frees them itself.
        root_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=torch.float32,
                                           cast_forward_inputs=False)
        fully_shard(model, mesh=mesh, mp_policy=root_policy, reshard_after_forward=for_ema)
    # fp32 master weights, AFTER sharding so each rank converts only its shard. At lr 1e-5 an update
    # is ~1e-3 of a weight, below bf16's resolution (2^-8 ≈ 4e-3): bf16 weights would not move.
    model = model.float().to(device)
    return model.requires_grad_(False) if for_ema else model


def checkpoint_dirs(out):
    """Complete checkpoints, oldest first (a directory is renamed into place only when complete)."""
    return sorted(glob.glob(os.path.join(out, "checkpoints", "step_" + "[0-9]" * 7)))


def save_checkpoint(args, model, ema, opt, step, logs, rank, world, seconds):
    """Every rank writes its shards into step_N.tmp/; rank 0 renames it to step_N/ once all are done."""
    final = os.path.join(args.out, "checkpoints", f"step_{step:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        for stale in glob.glob(os.path.join(args.out, "checkpoints", "step_*.tmp")):  # from a crashed save
            shutil.rmtree(stale)
        os.makedirs(tmp)
    if world > 1:
        dist.barrier()
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state}
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)
    device = next(model.parameters()).device
    try:
        dcp.save(state, checkpoint_id=tmp)
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "mps": torch.mps.get_rng_state() if device.type == "mps" else None},
                   os.path.join(tmp, f"rng_rank{rank}.pt"))
        if rank == 0:
            with open(os.path.join(tmp, "train_state.json"), "w") as f:
                json.dump({"step": step, "logs": logs, "world": world, "ema": ema is not None, "seconds": seconds,
                           "config": vars(args), "transformer_config": dict(model.config)}, f, indent=1)
    except (Exception, CheckpointException) as e:  # a full disk, a lost mount. (DCP's exception is a
        # BaseException that wraps each rank's traceback: keep the root cause, on one line)
        raise SystemExit(f"error: could not write {tmp} ({last_line(e)}); the complete checkpoints are kept")
    if world > 1:
        dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(args.out)[:-args.keep]:
            shutil.rmtree(old)
    if world > 1:
        dist.barrier()
    return final


def last_line(error):
    """The root cause of an error, on one line (DCP wraps each rank's traceback in its message)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def read_train_state(path):
    try:
        return json.load(open(os.path.join(path, "train_state.json")))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path}: not a checkpoint of this script ({type(e).__name__}: {e})")


# What describes this invocation, not the run: --resume never takes these from the checkpoint.
THIS_INVOCATION = ("out", "resume", "device", "cache", "plan", "gpu_memory", "precompute", "data", "shard_size",
                   "encode_batch", "export", "sample", "ckpt", "prompts", "nfe", "pipeline_steps", "given")


def resume_settings(args, config, path):
    """--resume continues the checkpoint's run: every setting not given on this command line takes the
    run's value. A different --method, or an --ema that adds or drops the EMA copy, is refused; any
    other flag given again (a longer --train-steps, a new --lr or EMA decay, --model at another path)
    wins, and is reported."""
    changed = []
    for key, saved in config.items():
        if key in THIS_INVOCATION or not hasattr(args, key):
            continue
        if key not in args.given:
            setattr(args, key, saved)
        elif saved != getattr(args, key):
            if key == "method" or (key == "ema" and (saved > 0) != (getattr(args, key) > 0)):
                raise SystemExit(f"error: --resume {path}: trained with --{key} {saved}, not {getattr(args, key)}")
            changed.append(f"--{key.replace('_', '-')} {getattr(args, key)} (the run's: {saved})")
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"resume with {', '.join(changed)}")


def load_checkpoint(path, model, ema, opt, rank, world, method):
    """Load the shards of `path` into the (sharded) model, EMA and optimizer; any world size."""
    state = read_train_state(path)
    if state["config"]["method"] != method:
        raise SystemExit(f"error: --resume {path}: trained with --method {state['config']['method']}, not {method}")
    if state["ema"] != (ema is not None):
        raise SystemExit(f"error: --resume {path}: saved {'with' if state['ema'] else 'without'} an EMA; "
                         f"set --ema accordingly")
    model_state, optim_state = get_state_dict(model, opt)
    target = {"model": model_state, "optim": optim_state}
    if ema is not None:
        target["ema"] = get_model_state_dict(ema)
    try:
        dcp.load(target, checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # (CheckpointException is a BaseException)
        raise SystemExit(f"error: --resume {path}: unreadable checkpoint ({last_line(e)})")
    set_state_dict(model, opt, model_state_dict=target["model"], optim_state_dict=target["optim"])
    if ema is not None:
        ema.load_state_dict(target["ema"])
    rng_path = os.path.join(path, f"rng_rank{rank}.pt")
    if state["world"] == world and os.path.isfile(rng_path):  # an exact continuation
        rng = torch.load(rng_path, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        device = next(model.parameters()).device
        if rng["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
        if rng["mps"] is not None and device.type == "mps":
            torch.mps.set_rng_state(rng["mps"])
    else:  # a different number of GPUs: fresh, distinct streams
        torch.manual_seed(state["config"]["seed"] + 1000 * rank + state["step"])
    return state["step"], state["logs"]


# ----------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------
def train(args, rank, world, device):
    cache = Cache(args.cache)
    per_rank = args.batch // world
    model = build(args, world, device)
    ema = build(args, world, device, for_ema=True) if args.ema > 0 else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0)
    step, logs, last_saved = 0, [], None  # last_saved: (step, path) of the newest checkpoint on disk
    torch.manual_seed(args.seed + 1000 * rank)  # each rank draws its own batches and noise
    if args.resume:  # (its settings: parse_args)
        found = checkpoint_dirs(args.out)
        step, logs = load_checkpoint(found[-1], model, ema, opt, rank, world, args.method)
        if "lr" in args.given:  # a new --lr wins; without one, the optimizer state's saved lr goes on
            for group in opt.param_groups:
                group["lr"] = args.lr
        last_saved = (step, found[-1])
    seconds_before = read_train_state(found[-1]).get("seconds", 0.0) if args.resume else 0.0
    started = time.time()
    seconds = lambda: seconds_before + time.time() - started  # training time, summed over every --resume
    velocity = velocity_fn(model, cache.meta["grid"])
    target_model = velocity_fn(ema, cache.meta["grid"]) if ema is not None else velocity
    null_text = cache.null.to(device)
    null_cond = {"text": null_text.expand(per_rank, -1, -1), "text_mask": torch.ones(
        per_rank, len(null_text), dtype=torch.long, device=device)}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=args.bf16 and not dist.is_initialized() and device.type == "cuda")
    if rank == 0:
        print(f"{args.method}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, "
              f"{len(cache)} pairs, world size {world}, global batch {per_rank * world} ({per_rank} per rank), "
              f"device {device}, from step {step}")
    bar = tqdm(range(step, args.train_steps), desc=args.method, disable=rank != 0, initial=step,
               total=args.train_steps)
    # Ctrl-C, or a scheduler's SIGTERM before preemption, finishes the current step, then saves:
    # never half an optimizer update.
    interrupted = []
    previous_handlers = {sig: signal.signal(sig, lambda *_: interrupted.append(True))
                         for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for step in bar:
            stop = torch.tensor(float(bool(interrupted)), device=device)
            if world > 1:  # every rank stops at the same step
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if stop:
                break
            index = torch.randint(len(cache), (per_rank,))
            x, text, text_mask = cache.batch(index, torch.rand(per_rank) < args.text_dropout, device)
            with autocast:  # common.py computes every loss and target in float32
                loss, terms = training_loss(velocity, target_model, x, method=args.method,
                                            cond={"text": text, "text_mask": text_mask}, null_cond=null_cond,
                                            kappa=args.kappa, order=args.order, rectify_weight=args.rectify_weight)
            bad = torch.tensor(float(not torch.isfinite(loss)), device=device)
            if world > 1:  # decide together, or the other ranks wait forever in backward()
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad:  # stop; the last checkpoint on disk is still good
                raise SystemExit(f"error: {args.method}: loss is {loss.item()} at step {step} (on some rank); "
                                 f"try a lower --lr, then --resume")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # (a DTensor)
            if not torch.isfinite(grad_norm):  # (the same on every rank: the norm is over all the shards)
                raise SystemExit(f"error: {args.method}: gradient norm is {grad_norm.item()} at step {step}; "
                                 f"try a lower --lr, then --resume")
            opt.step()
            if ema is not None:
                update_ema(ema, model, args.ema, step)
            if step % args.log_every == 0:
                if world > 1:  # the mean over ranks, for the log (gloo has no AVG)
                    for value in terms.values():
                        dist.all_reduce(value)
                logs.append({"step": step, **{k: v.item() / world for k, v in terms.items()}})
                bar.set_postfix(loss=f"{logs[-1]['loss']:.4f}", refresh=False)
            if (step + 1) % args.ckpt_every == 0:
                last_saved = (step + 1, save_checkpoint(args, model, ema, opt, step + 1, logs, rank, world, seconds()))
        else:
            step = max(step, args.train_steps)  # (a resumed run may already be past --train-steps)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    # (every rank decides from the same counter: a collective save entered by some ranks only would hang)
    if last_saved and last_saved[0] == step:  # already on disk (--ckpt-every, or a resume at the end): not twice
        path = last_saved[1]
    else:
        path = save_checkpoint(args, model, ema, opt, step, logs, rank, world, seconds())
    if interrupted and step < args.train_steps:
        if rank == 0:  # `step` is the first step not taken: resume starts there
            print(f"\ninterrupted: saved step {step} to {path}; continue with --resume")
        raise SystemExit(130)
    return logs, path, seconds()


# ----------------------------------------------------------------------------------------------
# Export: the newest checkpoint → a diffusers `transformer/` folder (bf16 safetensors)
# ----------------------------------------------------------------------------------------------
def export(args):
    """One process, no GPU and no base model needed: the shards are read straight into bf16 tensors
    of the full shapes (half the RAM of fp32), the EMA if the run kept one."""
    from huggingface_hub import save_torch_state_dict
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    found = checkpoint_dirs(args.out)
    if not found:
        raise SystemExit(f"error: --export: no checkpoint in {args.out}/checkpoints")
    state = read_train_state(found[-1])
    which = "ema" if state["ema"] else "model"
    try:
        reader = FileSystemReader(found[-1])
        items = reader.read_metadata().state_dict_metadata
        weights = {key[len(which) + 1:]: torch.empty(item.size, dtype=torch.bfloat16)
                   for key, item in items.items()
                   if key.startswith(which + ".") and isinstance(item, TensorStorageMetadata)}
        dcp.load({which: weights}, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
    except (Exception, CheckpointException) as e:
        raise SystemExit(f"error: {found[-1]}: unreadable checkpoint ({last_line(e)})")
    folder = os.path.join(args.export, "transformer")
    os.makedirs(folder, exist_ok=True)
    with torch.device("meta"):  # only for its config.json
        TwinFlowQwenImageTransformer(**{k: v for k, v in state["transformer_config"].items()
                                        if not k.startswith("_")}).save_config(folder)
    save_torch_state_dict(weights, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors")
    print(f"exported the {which} weights of {found[-1]} (step {state['step']}) to {folder}")
    return folder


# ----------------------------------------------------------------------------------------------
# Sample: the TwinFlow sampler at 1, 2, 4 NFE through the pipeline's components
# ----------------------------------------------------------------------------------------------
GAPS = {1: (0.0, 0.0), 2: (0.001, 0.6), 4: (0.001, 0.5)}  # the authors' grids: 0.999 → 0.6 → 0, ...


@torch.no_grad()
def sample_images(args, device):
    torch.manual_seed(args.seed)  # the fresh noise of the 2- and 4-NFE re-noising steps
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = load_transformer(args.ckpt, dtype)
    try:
        pipe = QwenImagePipeline.from_pretrained(args.model, transformer=transformer, text_encoder=None,
                                                 tokenizer=None, dtype=dtype).to(device)
    except Exception as e:
        raise SystemExit(f"error: --model {args.model}: cannot load the pipeline ({type(e).__name__})")
    prompts = [p.strip() for p in args.prompts.split("|") if p.strip()]
    text, text_mask = load_text_encoder(args.model, device, args.max_text_len)(prompts)
    text, text_mask = text.to(device, dtype), text_mask.to(device)
    grid = (args.resolution // 16, args.resolution // 16)
    velocity = velocity_fn(pipe.transformer, grid)
    noise = torch.randn(len(prompts), grid[0] * grid[1], transformer.config.in_channels,
                        generator=torch.Generator().manual_seed(args.seed)).to(device, dtype)
    os.makedirs(args.out, exist_ok=True)
    written = {}
    for nfe in [int(k) for k in args.nfe.split(",")]:
        # 1 NFE: x̂ = z − F(z, 1, 0). More: predict x̂ at each grid time and re-noise (stochastic ratio 1).
        latents = sample(velocity, noise, steps=nfe, style="few", stochastic_ratio=1.0 if nfe > 1 else 0.0,
                         gap=GAPS.get(nfe, (0.001, 0.0)), cond={"text": text, "text_mask": text_mask})
        written[f"nfe{nfe}"] = decode_latents(pipe.vae, latents, args.resolution, pipe.vae_scale_factor).cpu()
    # The pipeline's own flow-matching sampler (tt = t), the many-step reference. No CFG: training with
    # κ > 0 baked guidance into the model, and guiding again would count it twice.
    if args.pipeline_steps:
        images = pipe(prompt_embeds=text, prompt_embeds_mask=text_mask, height=args.resolution,
                      width=args.resolution, num_inference_steps=args.pipeline_steps, output_type="pt",
                      latents=noise).images
        written[f"pipeline_{args.pipeline_steps}steps"] = images.float().cpu()
    for name, images in written.items():
        save_image(make_grid(images, nrow=len(prompts), pad_value=1), os.path.join(args.out, f"{name}.png"))
    print(f"wrote {', '.join(written)} (.png) for {len(prompts)} prompt(s) to {args.out}")
    return written


# ----------------------------------------------------------------------------------------------
# Main: --plan, --precompute, train, --export or --sample
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.plan:
        return plan(args)
    if args.export:
        return export(args)
    rank, world, device = setup_distributed(args)
    try:
        if args.sample:
            return sample_images(args, device) if rank == 0 else None
        if args.precompute:
            return precompute(args, rank, world, device)
        if args.batch // world < 4:
            parser.error(f"--batch {args.batch} over {world} rank(s): each needs at least 4 (twinflow splits in 4)")
        logs, path, seconds = train(args, rank, world, device)
        if rank == 0:
            print(f"trained to {path}: {seconds:.0f} s of training (summed over every --resume)")
        return logs
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
