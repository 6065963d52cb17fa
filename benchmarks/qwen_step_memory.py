"""One real training step of a Qwen-Image-shaped transformer at reduced depth: the measured peak GPU
memory next to what `scale_qwen_image.py --plan` predicts for the same config. This is the check the
plan needs before anyone trusts it at 20B.

    torchrun --nproc_per_node 1 benchmarks/qwen_step_memory.py                   # 4 blocks (1.4B), 1 GPU
    torchrun --nproc_per_node 8 benchmarks/qwen_step_memory.py --layers 8 --batch 32
    python benchmarks/qwen_step_memory.py --layers 2 --heads 2 --resolution 64 --text-len 16 --device cpu  # smoke run

The weights are random, in the real Qwen-Image shape (width 3072 = 24 heads × 128, text width 3584),
and so are the packed latents and caption embeddings, of the real sizes. The step is
scale_qwen_image.py's own: build() (FSDP2 under torchrun, fp32 master weights, bf16 compute,
activation checkpointing), then training_loss from common.py, backward, clipping and AdamW. The peak
is torch.cuda.max_memory_allocated over --steps steps; the optimizer state appears at the first step.
On other devices the step runs, but memory is not measured. Run it under torchrun on CUDA: the plan
models FSDP2's bf16 compute with fp32 master weights; plain python on CUDA runs the step unsharded,
under autocast, so its ratios to the plan are printed with a warning.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scale_qwen_image as sq  # noqa: E402
from common import training_loss  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--layers", type=int, default=4, help="blocks (Qwen-Image has 60)")
parser.add_argument("--heads", type=int, default=24, help="attention heads of 128 (Qwen-Image: 24)")
parser.add_argument("--resolution", type=int, default=1024)
parser.add_argument("--text-len", type=int, default=512, help="caption tokens per image")
parser.add_argument("--batch", type=int, default=4, help="global batch")
parser.add_argument("--method", default="twinflow", choices=["flow", "rcgm", "twinflow"])
parser.add_argument("--ema", type=float, default=0.0)
parser.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--device", default="auto")
args = parser.parse_args()

script_args = sq.parse_args(["--cache", "unused", "--batch", str(args.batch), "--resolution", str(args.resolution),
                             "--max-text-len", str(args.text_len), "--method", args.method, "--ema", str(args.ema),
                             "--device", args.device, "--grad-ckpt" if args.grad_ckpt else "--no-grad-ckpt"])
rank, world, device = sq.setup_distributed(script_args)
parts = {"flow": 1, "rcgm": 3, "twinflow": 4}[args.method]  # training_loss splits each rank's batch
if args.batch // world < parts or args.steps < 1:  # fail before building a 1.4B-parameter model
    parser.error(f"--batch {args.batch} over {world} rank(s) is {args.batch // world} per rank: {args.method} "
                 f"needs at least {parts}; --steps must be at least 1 (got {args.steps})")
config = dict(num_layers=args.layers, num_attention_heads=args.heads)  # the rest: the defaults = Qwen-Image's


def random_transformer(name, dtype=torch.bfloat16):
    """Stands in for from_pretrained: random weights of the same shapes (nothing to download)."""
    torch.manual_seed(0)
    return torch.nn.Module.to(sq.TwinFlowQwenImageTransformer(**config), dtype)


sq.load_transformer = random_transformer
model = sq.build(script_args, world, device)
ema = sq.build(script_args, world, device, for_ema=True) if args.ema else None
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0)
per_rank = args.batch // world
grid = (args.resolution // 16, args.resolution // 16)
velocity = sq.velocity_fn(model, grid)
target = sq.velocity_fn(ema, grid) if ema is not None else velocity
text_width = model.config.joint_attention_dim
x = torch.randn(per_rank, grid[0] * grid[1], model.config.in_channels, device=device)
cond = {"text": torch.randn(per_rank, args.text_len, text_width, device=device, dtype=torch.bfloat16),
        "text_mask": torch.ones(per_rank, args.text_len, dtype=torch.long, device=device)}
null = {"text": torch.randn(per_rank, 8, text_width, device=device, dtype=torch.bfloat16),
        "text_mask": torch.ones(per_rank, 8, dtype=torch.long, device=device)}
cuda = device.type == "cuda"
if cuda:
    torch.cuda.reset_peak_memory_stats(device)
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and not torch.distributed.is_initialized())
for step in range(args.steps):
    with autocast:
        loss, _ = training_loss(velocity, target, x, method=args.method, cond=cond, null_cond=null, kappa=0.8)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    if rank == 0:
        print(f"step {step}: loss {loss.item():.4f}")

script_args.plan = world
predicted = sq.plan(script_args, config=config, verbose=False)
static = sum(predicted["rows"][k] for k in predicted["rows"] if "in flight" not in k)
total = predicted["total_checkpointed" if args.grad_ckpt else "total_full"]
if rank == 0:
    print(f"\n{predicted['parameters'] / 1e9:.2f}B parameters ({args.layers} blocks), {world} rank(s), {per_rank} "
          f"image(s) per rank at {args.resolution}², {args.text_len} text tokens, {args.method}, device {device}")
    print(f"  predicted: weights + gradients + AdamW{' + EMA' if args.ema else ''} {static / sq.GiB:.2f} GiB, "
          f"peak {total / sq.GiB:.2f} GiB per GPU")
    if cuda:
        allocated, peak = torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
        print(f"  measured:  allocated after the step {allocated / sq.GiB:.2f} GiB ({allocated / static:.2f}× predicted), "
              f"peak {peak / sq.GiB:.2f} GiB ({peak / total:.2f}× predicted)  [{torch.cuda.get_device_name(device)}]")
        if not torch.distributed.is_initialized():
            print("  warning: not under torchrun, so no FSDP2 (autocast instead): the plan models another setup")
    else:
        print("  measured:  not on this device (CUDA only)")
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
