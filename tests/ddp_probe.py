"""Runs a training script's main() under torchrun and keeps what each rank saw, so that a test can
check what a finished multi-process run cannot show on its own:

- each rank trains on batches of its own (the same seed on every rank would repeat one batch),
- the ranks' weights stay the same (a loss computed through the bare model instead of the DDP
  wrapper never averages the gradients, so each rank drifts on its own batches).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_probe.py mnist_twinflow [--skip-md5] [flags...]

Each rank writes {--out}/probe_rank{rank}.pt: {"batches": the x of every training_loss call,
"losses": the loss each call returned (this rank's own, before any averaging for the log),
"ema": the EMA's weights (when train() returns an EMA first)}.
"""
import importlib
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def probe_command(script, flags, skip_md5=False):
    """The torchrun command that runs `script` (a module name) with `flags` through this probe, on 2
    processes. --standalone lets torchrun's rendezvous store take a free port itself (a port picked
    here and released could be taken by another process first); --local-addr keeps it on loopback,
    where it would otherwise use this machine's hostname, which a sandbox may not resolve (a hang).
    skip_md5: skip torchvision's checksum of CIFAR's files (a tiny test CIFAR cannot match it)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
            "--nproc_per_node", "2",
            os.path.abspath(__file__), script, *(["--skip-md5"] if skip_md5 else []), *flags]


def check_two_ranks(out, steps, same_weights=True):
    """Both ranks took `steps` steps, each on batches of its own, and (same_weights) ended with the
    same EMA weights. The probe's files are removed once read, so a later run in the same folder
    cannot pass on them; what they held is returned, one dict per rank."""
    paths = [os.path.join(out, f"probe_rank{rank}.pt") for rank in (0, 1)]
    ranks = [torch.load(path) for path in paths]
    for path in paths:
        os.remove(path)
    assert [len(r["batches"]) for r in ranks] == [steps, steps]
    for step, (x0, x1) in enumerate(zip(ranks[0]["batches"], ranks[1]["batches"])):
        assert x0.shape == x1.shape and not torch.equal(x0, x1), f"step {step}: both ranks trained on one batch"
    if same_weights:
        assert ranks[0]["ema"] is not None and ranks[1]["ema"] is not None, "train() returned no EMA"
        for name, weight in ranks[0]["ema"].items():
            assert torch.equal(weight, ranks[1]["ema"][name]), f"{name}: the ranks' weights drifted apart"
    return ranks


def run_main_recording(script_name, argv):
    sys.path.insert(0, ROOT)
    script = importlib.import_module(script_name)
    batches, losses = [], []
    training_loss, train = script.training_loss, script.train

    def recording_loss(model, ema_model, x, *args, **kwargs):
        batches.append(x.detach().float().cpu().clone())
        loss, terms = training_loss(model, ema_model, x, *args, **kwargs)
        losses.append(loss.item())
        return loss, terms

    def recording_train(args, rank, world, device):
        result = train(args, rank, world, device)
        ema = result[0] if isinstance(result[0], torch.nn.Module) else None
        os.makedirs(args.out, exist_ok=True)
        torch.save({"batches": batches, "losses": losses,
                    "ema": None if ema is None else {k: v.cpu() for k, v in ema.state_dict().items()}},
                   os.path.join(args.out, f"probe_rank{rank}.pt"))
        return result

    script.training_loss, script.train = recording_loss, recording_train
    script.main(argv)


if __name__ == "__main__":
    argv = sys.argv[2:]
    if argv[:1] == ["--skip-md5"]:
        import torchvision.datasets.cifar
        torchvision.datasets.cifar.check_integrity = lambda *args, **kwargs: True
        argv = argv[1:]
    run_main_recording(sys.argv[1], argv)
