"""What one training step costs: flow matching vs RCGM vs TwinFlow, same model and batch.

    python benchmarks/step_cost.py                       # a small conv net on 32×32 images
    python benchmarks/step_cost.py --model mlp --width 256 --batch 512   # the toy_2d.py MLP
    python benchmarks/step_cost.py --model unet --batch 32   # cifar_twinflow.py's UNet (--unet-preset cpu|gpu)
    python benchmarks/step_cost.py --model dit --dit S/2 --batch 16   # imagenet_twinflow.py's transformer
    python benchmarks/step_cost.py --model qwen --batch 8     # a 2-block Qwen-Image-shaped transformer
    python benchmarks/step_cost.py --device cuda --bf16 --compile --model unet --unet-preset gpu --batch 128

A step is everything a training loop does: loss (with its no-grad EMA/target passes), backward,
optimizer step, EMA update. Time: the median of --steps timed steps after --warmup ones.
Memory: the bytes of tensors autograd saves for backward, leaving out the weights (and their bf16
copies under autocast), so the activations, which are what grows with the loss (any device; counted
without torch.compile, whose fused graphs may save less); on CUDA also the peak allocated memory
during the step, in all and above what was allocated before it (weights, EMA, Adam state). Each
row is printed when it is done; one that runs out of memory prints OOM and the next one runs.
Rows: each method with split=True (our default: the batch is cut into parts, one job per part) and
TwinFlow with split=False (the tutorial's form: every term on the whole batch), without and with
the enhanced target (kappa > 0: two more no-grad EMA passes).
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import training_loss, update_ema  # noqa: E402
import cifar_twinflow  # noqa: E402  (its UNet)
import imagenet_twinflow  # noqa: E402  (its transformer)
from toy_2d import MLP, pick_device  # noqa: E402  (the toy's MLP and device choice)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="conv", choices=["conv", "mlp", "unet", "dit", "qwen"])
parser.add_argument("--unet-preset", default="cpu", choices=["cpu", "gpu"], help="size of the CIFAR UNet")
parser.add_argument("--dit", default="S/2", choices=["S/2", "B/2", "L/2", "XL/2"],
                    help="size of imagenet_twinflow.py's transformer, on 4×32×32 latents (256 px)")
parser.add_argument("--qwen-layers", type=int, default=2,
                    help="blocks of scale_qwen_image.py's transformer (4 heads of 128, text width 3584; "
                         "256 px latents, 64 caption tokens)")
parser.add_argument("--compile", action="store_true", help="torch.compile the model being trained")
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--width", type=int, default=64, help="channels (conv) or hidden units (mlp)")
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--device", default="auto")
parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward passes")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


class ConvNet(nn.Module):
    """A small class-conditional residual conv net on (B, 3, 32, 32), t and tt embedded."""

    def __init__(self, width=64, blocks=4, classes=10):
        super().__init__()
        self.time = nn.Sequential(nn.Linear(2 * 32, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(classes + 1, width)  # the last class is the null class
        self.inp = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(),
                                                  nn.Conv2d(width, width, 3, padding=1),
                                                  nn.GroupNorm(8, width), nn.SiLU(),
                                                  nn.Conv2d(width, width, 3, padding=1))
                                    for _ in range(blocks))
        self.out = nn.Conv2d(width, 3, 3, padding=1)
        self.register_buffer("freqs", torch.exp(torch.linspace(0, 6, 16)))

    def forward(self, x_t, t, tt, y):
        angles = torch.cat([t[:, None] * self.freqs, tt[:, None] * self.freqs], 1)
        emb = self.time(torch.cat([angles.sin(), angles.cos()], 1)) + self.label(y)
        h = self.inp(x_t)
        for block in self.blocks:
            h = h + block(h + emb[:, :, None, None])
        return self.out(h)


def build(args, device):
    torch.manual_seed(0)
    if args.model == "conv":
        model = ConvNet(args.width).to(device)
        x = torch.randn(args.batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        cond, null_cond = {"y": y}, {"y": torch.full_like(y, 10)}
    elif args.model == "unet":  # class-conditional, so the enhanced target can be measured too
        config = vars(cifar_twinflow.parse_args(["--preset", args.unet_preset, "--class-cond"]))
        model = cifar_twinflow.build_model(config).to(device)
        x = torch.randn(args.batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        cond, null_cond = {"y": y}, {"y": torch.full_like(y, 10)}
    elif args.model == "dit":
        depth, hidden, heads = imagenet_twinflow.MODELS[args.dit]
        model = imagenet_twinflow.DiT(depth, hidden, heads, channels=4, size=32, num_classes=1000).to(device)
        x = torch.randn(args.batch, 4, 32, 32, device=device)
        y = torch.randint(0, 1000, (args.batch,), device=device)
        cond, null_cond = {"y": y}, {"y": torch.full_like(y, 1000)}
    elif args.model == "qwen":  # text-conditional; the empty prompt is the null condition
        import scale_qwen_image  # (diffusers and transformers: imported only here)

        class Qwen(nn.Module):  # common.py's contract around the transformer
            def __init__(self):
                super().__init__()
                self.transformer = scale_qwen_image.TwinFlowQwenImageTransformer(
                    num_layers=args.qwen_layers, num_attention_heads=4)

            def forward(self, x_t, t, tt, text, text_mask):
                return scale_qwen_image.velocity_fn(self.transformer, (16, 16))(x_t, t, tt, text, text_mask)
        model = Qwen().to(device)
        x = torch.randn(args.batch, 16 * 16, 64, device=device)
        text = lambda n: torch.randn(args.batch, n, 3584, device=device)  # noqa: E731
        ones = lambda n: torch.ones(args.batch, n, dtype=torch.long, device=device)  # noqa: E731
        cond, null_cond = {"text": text(64), "text_mask": ones(64)}, {"text": text(5), "text_mask": ones(5)}
    else:
        model = MLP(args.width).to(device)
        x, cond, null_cond = torch.randn(args.batch, 2, device=device), {}, None
    return model, x, cond, null_cond


def measure(args, device, method, split, kappa):
    model, x, cond, null_cond = build(args, device)
    if kappa and null_cond is None:
        return None
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    net = torch.compile(model) if args.compile else model
    saved = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}

    def pack(tensor):  # count each storage autograd keeps for backward once; not the weights themselves,
        storage = tensor.untyped_storage()  # nor autocast's low-precision copies of them (same shape)
        if storage.data_ptr() in weights or (args.bf16 and tensor.dtype != torch.float32
                                             and tuple(tensor.shape) in weight_shapes):
            return tensor
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def step(i, count_memory=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            if count_memory:  # eagerly: saved-tensor hooks and torch.compile do not mix well
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss, _ = training_loss(model, ema, x, method, cond, null_cond, kappa, split=split)
            else:
                loss, _ = training_loss(net, ema, x, method, cond, null_cond, kappa, split=split)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, 0.99, i)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif device.type == "mps":
            torch.mps.synchronize()

    for i in range(args.warmup):
        step(i)
    times = []
    for i in range(args.steps):
        sync()
        start = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":  # the peak of a step without the counting hooks
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(0)
        peak = torch.cuda.max_memory_allocated()
    step(0, count_memory=True)
    result = {"ms": 1000 * statistics.median(times), "saved_mb": sum(saved.values()) / 2**20}
    if device.type == "cuda":
        result.update(peak_mb=peak / 2**20, peak_step_mb=(peak - before) / 2**20)
    return result


def main(argv=None):
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rows = [("flow", True, 0.0), ("rcgm", True, 0.0), ("twinflow", True, 0.0), ("twinflow", False, 0.0),
            ("flow", True, 0.5), ("twinflow", True, 0.5)]
    size = {"unet": f"preset {args.unet_preset}", "dit": args.dit,
            "qwen": f"{args.qwen_layers} blocks"}.get(args.model, f"width {args.width}")
    print(f"device {device}, model {args.model} ({size}), batch {args.batch}, "
          f"bf16 {args.bf16}, compile {args.compile}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    has_peak = device.type == "cuda"
    print(f"{'method':<10} {'form':<9} {'kappa':>5} {'ms/step':>9} {'× flow':>7} {'images/s':>9} "
          f"{'saved MB':>9} {'× flow':>7}" + (f" {'peak MB':>9} {'of step':>9} {'× flow':>7}" if has_peak else ""))
    results = {}
    for method, split, kappa in rows:  # flow first: every ratio is against plain, unguided flow matching
        label = f"{method:<10} {'split' if split else 'whole':<9} {kappa:>5}"
        try:
            r = measure(args, device, method, split, kappa)
        except torch.OutOfMemoryError:  # report it and go on: the rows measured so far are printed
            print(f"{label} OOM", flush=True)
            r = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if r is None:
            continue
        results[(method, split, kappa)] = r
        ref = results.get(("flow", True, 0.0), r)
        line = (f"{label} {r['ms']:9.1f} {r['ms'] / ref['ms']:7.2f} {args.batch / r['ms'] * 1000:9.1f} "
                f"{r['saved_mb']:9.1f} {r['saved_mb'] / ref['saved_mb']:7.2f}")
        if has_peak:
            line += f" {r['peak_mb']:9.1f} {r['peak_step_mb']:9.1f} {r['peak_step_mb'] / ref['peak_step_mb']:7.2f}"
        print(line, flush=True)
    return results


if __name__ == "__main__":
    main()
