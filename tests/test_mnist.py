"""mnist_twinflow.py on a tiny MNIST written in the real idx format, so the real loader runs."""
import importlib.util
import json
import os
import shutil
import signal
import struct
import subprocess

import numpy as np
import pytest
import torch
import torch.nn as nn

import mnist_twinflow
from ddp_probe import check_two_ranks, probe_command
from faults import counting_optimizer_steps, ctrl_c_during_call, failing_save, infinite_gradient, nan_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("mnist_table", os.path.join(ROOT, "benchmarks", "mnist_table.py"))
mnist_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mnist_table)


def write_idx_mnist(root, n_train=64, n_test=32, seed=0):
    """MNIST/raw/ with torchvision's file names: a bright bar whose position encodes the class."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for image, label in zip(images, labels):
            image[4 + 2 * label: 6 + 2 * label, 4:24] = 255
        with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_idx_mnist(str(tmp_path_factory.mktemp("mnist")))


def tiny(data_root, out, *extra):
    """Flags for a run that takes seconds: a narrow UNet, batch 8, 20 evaluation samples."""
    return ["--data-root", data_root, "--no-download", "--out", str(out), "--channels", "8,16,16",
            "--batch", "8", "--train-steps", "4", "--num-eval", "20", "--many-steps", "3",
            "--classifier", os.path.join(data_root, "classifier.pt"), "--classifier-epochs", "30",
            "--device", "cpu", *extra]


def test_loader_reads_the_idx_files(data_root):
    images, labels = mnist_twinflow.load_mnist(data_root, train=True, download=False)
    assert images.shape == (64, 1, 28, 28) and labels.tolist() == [i % 10 for i in range(64)]
    assert images.min() == -1 and images.max() == 1  # [−1, 1]: black pixels are −1, the bars +1


def test_missing_data_is_a_one_line_error_naming_the_flag(tmp_path):
    with pytest.raises(SystemExit) as e:
        mnist_twinflow.main(tiny(str(tmp_path / "empty"), tmp_path / "o"))
    message = str(e.value)
    assert message.startswith("error: --data-root") and "\n" not in message


def test_bad_flags_are_refused(data_root, tmp_path):
    for flags in (["--channels", "8,16"], ["--batch", "2"], ["--sample"], ["--train-steps", "0"], ["--order", "0"],
                  ["--ema", "1"], ["--label-dropout", "0"],  # (the last: κ > 0 needs a trained null class)
                  ["--many-steps", "4"], ["--lr", "0"], ["--classifier-epochs", "0"]):
        with pytest.raises(SystemExit) as e:
            mnist_twinflow.main(tiny(data_root, tmp_path / "o") + flags)
        assert e.value.code == 2, flags  # argparse's usage error


def test_the_sign_of_t_reaches_the_unet():
    torch.manual_seed(0)
    model = mnist_twinflow.UNet((8, 16, 16))
    x, t, y = torch.randn(4, 1, 28, 28), torch.rand(4), torch.arange(4)
    assert model(x, t, t, y).shape == x.shape
    assert not torch.allclose(model(x, t, t, y), model(x, -t, -t, y))


@pytest.mark.parametrize("method", ["flow", "twinflow"])
def test_training_writes_checkpoint_grids_and_metrics(data_root, tmp_path, method):
    out = tmp_path / method
    result = mnist_twinflow.main(tiny(data_root, out, "--method", method))
    for name in ["checkpoint.pt", "grids.png", "grid_nfe1.png", "grid_nfe3.png", "losses.png", "metrics.json"]:
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["steps"] == 4
    for nfe in (1, 2, 4, 3):
        assert 0 <= metrics[f"nfe{nfe}"]["accuracy"] <= 1 and np.isfinite(metrics[f"nfe{nfe}"]["fd"])
    assert metrics["data"]["accuracy"] > 0.5  # the evaluator itself learned the tiny classes
    assert result["nfe1"] == metrics["nfe1"]


def test_a_short_twinflow_training_improves_its_one_step_samples(data_root, tmp_path):
    """Measured: FD 1531 → 885 after 120 steps (100 samples, CPU); 0.44 to 0.58 of the start's FD
    on seeds 0–4. (Class accuracy moves too, 0.07 → 0.12, but that near chance it is no test.)"""
    flags = ["--method", "twinflow", "--lr", "2e-3", "--num-eval", "100"]
    start = mnist_twinflow.main(tiny(data_root, tmp_path / "start", *flags, "--train-steps", "1"))
    trained = mnist_twinflow.main(tiny(data_root, tmp_path / "trained", *flags, "--train-steps", "120"))
    assert trained["nfe1"]["fd"] < 0.7 * start["nfe1"]["fd"]


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(data_root, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    mnist_twinflow.main(tiny(data_root, straight, "--log-every", "1"))
    mnist_twinflow.main(tiny(data_root, resumed, "--log-every", "1", "--train-steps", "2"))
    mnist_twinflow.main(tiny(data_root, resumed, "--log-every", "1", "--resume"))
    logs_straight = torch.load(straight / "checkpoint.pt", weights_only=False)["logs"]
    logs_resumed = torch.load(resumed / "checkpoint.pt", weights_only=False)["logs"]
    assert [row["step"] for row in logs_resumed] == [0, 1, 2, 3]
    assert logs_resumed == logs_straight  # steps 2 and 3 ran after the restart, and match exactly


def test_a_corrupt_or_foreign_checkpoint_is_a_clear_error(data_root, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        mnist_twinflow.main(tiny(data_root, out, "--resume"))
    torch.save({"weights": 1}, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match="not a checkpoint of this script"):
        mnist_twinflow.main(tiny(data_root, out, "--resume"))
    with pytest.raises(SystemExit, match="no such checkpoint"):
        mnist_twinflow.main(tiny(data_root, out, "--sample", "--ckpt", str(out / "missing.pt")))
    mnist_twinflow.main(tiny(data_root, tmp_path / "t", "--train-steps", "1"))
    state = torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=False)
    state["config"]["channels"] = [16, 16, 16]  # all the keys, but another model's shapes
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match="does not fit this script's model"):
        mnist_twinflow.main(tiny(data_root, out, "--sample", "--ckpt", str(out / "checkpoint.pt")))


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(data_root, tmp_path, monkeypatch):
    original = mnist_twinflow.training_loss
    monkeypatch.setattr(mnist_twinflow, "training_loss", ctrl_c_during_call(original, 3))  # in step 2
    with pytest.raises(SystemExit) as e:
        mnist_twinflow.main(tiny(data_root, tmp_path / "o", "--log-every", "1"))
    assert e.value.code == 130
    assert torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=False)["step"] == 3  # step 2 was finished
    monkeypatch.setattr(mnist_twinflow, "training_loss", original)
    mnist_twinflow.main(tiny(data_root, tmp_path / "o", "--log-every", "1", "--resume"))
    mnist_twinflow.main(tiny(data_root, tmp_path / "straight", "--log-every", "1"))
    logs = [torch.load(d / "checkpoint.pt", weights_only=False)["logs"] for d in (tmp_path / "o", tmp_path / "straight")]
    assert logs[0] == logs[1]


def test_sigterm_in_the_last_step_stops_before_the_evaluation(data_root, tmp_path, monkeypatch):
    """A scheduler's SIGTERM is handled like Ctrl-C, even in the last step: the run saves and exits,
    and a --resume with nothing left to train goes straight to the evaluation."""
    original = mnist_twinflow.training_loss
    monkeypatch.setattr(mnist_twinflow, "training_loss", ctrl_c_during_call(original, 4, signal.SIGTERM))
    with pytest.raises(SystemExit) as e:
        mnist_twinflow.main(tiny(data_root, tmp_path / "o"))
    assert e.value.code == 130 and not (tmp_path / "o" / "metrics.json").exists()
    assert torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=False)["step"] == 4
    monkeypatch.setattr(mnist_twinflow, "training_loss", original)
    mnist_twinflow.main(tiny(data_root, tmp_path / "o", "--resume"))
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["steps"] == 4


def test_nan_loss_stops_without_touching_the_last_checkpoint(data_root, tmp_path, monkeypatch):
    out = tmp_path / "o"
    mnist_twinflow.main(tiny(data_root, out, "--train-steps", "2"))
    before = (out / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(mnist_twinflow, "training_loss", nan_loss)
    with pytest.raises(SystemExit, match="loss is nan at step 2"):
        mnist_twinflow.main(tiny(data_root, out, "--resume"))
    assert (out / "checkpoint.pt").read_bytes() == before


def test_an_infinite_gradient_stops_before_the_update(data_root, tmp_path, monkeypatch):
    out = tmp_path / "o"
    mnist_twinflow.main(tiny(data_root, out, "--train-steps", "2"))
    before = (out / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(mnist_twinflow, "training_loss", infinite_gradient(mnist_twinflow.training_loss))
    with counting_optimizer_steps() as steps, pytest.raises(SystemExit, match="gradient norm is (inf|nan) at step 2"):
        mnist_twinflow.main(tiny(data_root, out, "--resume", "--ckpt-every", "1"))
    assert steps == [] and (out / "checkpoint.pt").read_bytes() == before  # no update, nothing saved


def test_a_crash_while_saving_keeps_the_last_checkpoint(data_root, tmp_path, monkeypatch):
    """A full disk in the middle of a save: the previous checkpoint is untouched and resumes."""
    out = tmp_path / "o"
    mnist_twinflow.main(tiny(data_root, out, "--train-steps", "2"))
    before = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        mnist_twinflow.main(tiny(data_root, out, "--resume", "--train-steps", "3"))
    monkeypatch.setattr(torch, "save", real_save)
    assert (out / "checkpoint.pt").read_bytes() == before
    mnist_twinflow.main(tiny(data_root, out, "--resume", "--train-steps", "3"))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3


def test_resume_keeps_the_runs_settings_unless_given_again(data_root, tmp_path):
    """Every flag not given again comes from the checkpoint (not from the preset); a flag given again
    (a longer --train-steps, a new --lr) wins; metrics.json reports the step training reached."""
    out = tmp_path / "o"
    saved = lambda: torch.load(out / "checkpoint.pt", weights_only=False)
    mnist_twinflow.main(tiny(data_root, out, "--train-steps", "2", "--lr", "3e-4", "--kappa", "0", "--order", "1"))
    first_seconds = saved()["seconds"]
    # --label-dropout 0 is refused with the default κ = 0.5, not with the run's κ = 0: checked after the merge
    mnist_twinflow.main(tiny(data_root, out, "--train-steps", "3", "--resume", "--label-dropout", "0"))
    state = saved()
    assert state["opt"]["param_groups"][0]["lr"] == 3e-4 and state["step"] == 3
    assert state["config"]["kappa"] == 0 and state["config"]["order"] == 1 and state["config"]["lr"] == 3e-4
    assert state["config"]["label_dropout"] == 0
    assert state["seconds"] > first_seconds  # the training time adds up over the restarts
    with pytest.raises(SystemExit, match="trained with --preset cpu, not gpu"):
        mnist_twinflow.main(tiny(data_root, out, "--resume", "--preset", "gpu"))
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    mnist_twinflow.main(tiny(data_root, out, "--resume", "--lr", "1e-5"))
    assert saved()["opt"]["param_groups"][0]["lr"] == 1e-5 and saved()["step"] == 4
    with pytest.raises(SystemExit) as e:  # a new run would overwrite the checkpoint: --resume, or another --out
        mnist_twinflow.main(tiny(data_root, out, "--train-steps", "2"))
    assert e.value.code == 2 and saved()["step"] == 4


def test_label_dropout_and_the_null_class_reach_the_loss(data_root, tmp_path, monkeypatch):
    seen, real = [], mnist_twinflow.training_loss

    def spy(model, ema, x, *args, cond, null_cond, **kwargs):
        seen.append((cond["y"].clone(), null_cond["y"].clone(), x.clone()))
        return real(model, ema, x, *args, cond=cond, null_cond=null_cond, **kwargs)
    monkeypatch.setattr(mnist_twinflow, "training_loss", spy)
    mnist_twinflow.main(tiny(data_root, tmp_path / "o", "--batch", "64", "--label-dropout", "0.25"))
    labels = torch.cat([y for y, _, _ in seen])
    for y, _, x in seen:  # each label stays with its image: the class is the row of the bright bar
        kept = y != 10
        bars = x[kept, 0][torch.arange(int(kept.sum())), 4 + 2 * y[kept], 4:24]
        assert (bars == 1).all()
    assert all((null == 10).all() for _, null, _ in seen)  # guidance reads the null class
    assert 0.15 < (labels == 10).float().mean() < 0.35  # a quarter of the labels dropped (256 draws)
    assert set(labels[labels != 10].tolist()) <= set(range(10))


def test_the_flags_reach_the_loss_and_the_update_and_the_model_trains_on_the_training_split(
        data_root, tmp_path, monkeypatch):
    seen, clips, real_loss, real_clip = [], [], mnist_twinflow.training_loss, torch.nn.utils.clip_grad_norm_

    def spy(model, ema, x, **kwargs):
        seen.append((x.clone(), kwargs))
        return real_loss(model, ema, x, **kwargs)
    monkeypatch.setattr(mnist_twinflow, "training_loss", spy)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: clips.append(max_norm) or
                        real_clip(params, max_norm))
    mnist_twinflow.main(tiny(data_root, tmp_path / "o", "--method", "rcgm", "--kappa", "0.3", "--order", "3",
                             "--lr", "3e-4", "--train-steps", "2"))
    assert [(k["method"], k.get("kappa", 0.0), k.get("order", 2)) for _, k in seen] == [("rcgm", 0.3, 3)] * 2
    assert clips == [1.0, 1.0]  # the gradient norm is clipped at 1
    state = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=False)
    assert state["opt"]["param_groups"][0]["lr"] == 3e-4
    train_images, _ = mnist_twinflow.load_mnist(data_root, train=True, download=False)
    test_images, _ = mnist_twinflow.load_mnist(data_root, train=False, download=False)
    for x, _ in seen:  # every image trained on is a training image, none a test one
        assert all((train_images == row).flatten(1).all(1).any() for row in x)
        assert not any((test_images == row).flatten(1).all(1).any() for row in x)


def test_the_ema_follows_the_updated_weights_and_every_save_holds_its_steps_ema(data_root, tmp_path, monkeypatch):
    """update_ema after opt.step, with the warm-up decay min(ema, step/(step + 10)); --ckpt-every
    saves after the EMA update, at steps k·every (not one early)."""
    load = lambda out: torch.load(out / "checkpoint.pt", weights_only=False)
    mnist_twinflow.main(tiny(data_root, tmp_path / "one", "--train-steps", "1", "--ema", "0.5"))
    mnist_twinflow.main(tiny(data_root, tmp_path / "two", "--train-steps", "2", "--ema", "0.5"))
    mnist_twinflow.main(tiny(data_root, tmp_path / "low", "--train-steps", "2", "--ema", "0.05"))
    one, two, low = load(tmp_path / "one"), load(tmp_path / "two"), load(tmp_path / "low")
    for name, value in one["model"].items():
        assert torch.equal(one["ema"][name], value)  # step 0: decay 0, the EMA is the stepped model
        expected = torch.lerp(value, two["model"][name], 1 - 1 / 11) if value.is_floating_point() else value
        torch.testing.assert_close(two["ema"][name], expected)  # step 1: decay 1/11
        expected = torch.lerp(value, low["model"][name], 1 - 0.05) if value.is_floating_point() else value
        torch.testing.assert_close(low["ema"][name], expected)  # --ema 0.05 is below 1/11: it holds
    mnist_twinflow.main(tiny(data_root, tmp_path / "four", "--train-steps", "4", "--ema", "0.5"))
    saves, real_save = [], mnist_twinflow.save_checkpoint
    monkeypatch.setattr(mnist_twinflow, "save_checkpoint", lambda *a: saves.append(a[4]) or real_save(*a))
    mnist_twinflow.main(tiny(data_root, tmp_path / "every", "--train-steps", "4", "--ema", "0.5", "--ckpt-every", "2"))
    every, four = load(tmp_path / "every"), load(tmp_path / "four")
    assert saves == [2, 4] and every["logs"] == four["logs"]  # step 4's save is the last: not written twice
    assert all(torch.equal(every["ema"][k], v) for k, v in four["ema"].items())


def test_sampling_reads_the_ema_not_the_model_being_trained(data_root, tmp_path):
    mnist_twinflow.main(tiny(data_root, tmp_path / "o", "--train-steps", "1"))
    state = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=False)
    state["model"] = {k: torch.full_like(v, float("nan")) for k, v in state["model"].items()}
    torch.save(state, tmp_path / "poisoned.pt")
    mnist_twinflow.main(tiny(data_root, tmp_path / "s", "--sample", "--ckpt", str(tmp_path / "poisoned.pt"),
                             "--num", "10"))
    assert torch.load(tmp_path / "s" / "samples_nfe1.pt")["samples"].isfinite().all()


def test_sample_mode_writes_grids_and_evenly_spread_classes(data_root, tmp_path, monkeypatch):
    out = tmp_path / "o"
    mnist_twinflow.main(tiny(data_root, out, "--method", "rcgm", "--train-steps", "2"))
    calls, real_generate = [], mnist_twinflow.generate
    monkeypatch.setattr(mnist_twinflow, "generate", lambda model, method, labels, nfe, *args:
                        calls.append((labels, nfe)) or real_generate(model, method, labels, nfe, *args))
    mnist_twinflow.main(tiny(data_root, tmp_path / "s", "--sample", "--ckpt", str(out / "checkpoint.pt"),
                             "--nfe", "2", "--num", "30"))
    saved = torch.load(tmp_path / "s" / "samples_nfe2.pt")
    assert saved["samples"].shape == (30, 1, 28, 28) and saved["samples"].abs().max() <= 1
    assert torch.bincount(saved["labels"]).tolist() == [3] * 10
    *grids, (labels, nfe) = calls  # the grids' four columns (row i: class i), then the file, at --nfe
    assert [n for _, n in grids] == [1, 2, 4, 3] and nfe == 2 and torch.equal(labels, saved["labels"])
    assert all(torch.equal(labels, torch.arange(10).repeat_interleave(10)) for labels, _ in grids)
    assert (tmp_path / "s" / "grids.png").stat().st_size > 0


def test_eval_of_a_checkpoint_writes_metrics_the_table_reads(data_root, tmp_path, monkeypatch):
    out = tmp_path / "o"
    mnist_twinflow.main(tiny(data_root, out, "--method", "rcgm", "--train-steps", "2"))
    seconds = torch.load(out / "checkpoint.pt", weights_only=False)["seconds"]
    references, real_statistics = [], mnist_twinflow.reference_statistics
    monkeypatch.setattr(mnist_twinflow, "reference_statistics",
                        lambda classifier, real: references.append(real) or real_statistics(classifier, real))
    mnist_twinflow.main(tiny(data_root, tmp_path / "e", "--eval", "--ckpt", str(out / "checkpoint.pt")))
    test_images, _ = mnist_twinflow.load_mnist(data_root, train=False, download=False)
    assert len(references) == 1 and torch.equal(references[0], test_images)  # FD to the test split
    evaluated = json.loads((tmp_path / "e" / "metrics.json").read_text())
    trained = json.loads((out / "metrics.json").read_text())
    assert evaluated["steps"] == 2 and evaluated["train_seconds"] == round(seconds, 1)  # the checkpoint's time
    assert evaluated["weights"] == trained["weights"] == "EMA 0.99"
    for key in ("accuracy", "fd"):  # the same EMA, the same seeded noise and evaluator (not the same timing)
        assert evaluated["nfe1"][key] == trained["nfe1"][key]
    rows = mnist_table.table([str(out), str(tmp_path / "e")]).splitlines()
    assert rows[0].endswith("| FD 1 NFE ÷ FD 3 NFE |") and rows[2] == rows[3]  # both rows: rcgm, same numbers
    with pytest.raises(SystemExit, match="no_such_run.*not a readable metrics.json"):
        mnist_table.table([str(tmp_path / "no_such_run")])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.json").write_text(json.dumps({**trained, "nfe32": trained["nfe3"]}))
    with pytest.raises(SystemExit, match="other NFEs"):
        mnist_table.table([str(out), str(tmp_path / "other")])


def test_the_readme_mnist_table_is_the_scripts_output_on_the_saved_metrics(tmp_path):
    runs = []
    for method in ("flow", "rcgm", "twinflow"):
        (tmp_path / method).mkdir()
        shutil.copy(os.path.join(ROOT, "assets", "mnist", f"{method}_metrics.json"), tmp_path / method / "metrics.json")
        runs.append(str(tmp_path / method))
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert mnist_table.table(runs) in f.read()


def test_each_method_and_nfe_gets_its_sampler(monkeypatch):
    """flow: the ODE (Euler) at every NFE; the any-step models jump grid time to grid time, except
    in the many-step column (here 3), the ODE for every model. Labels go through in order."""
    calls = []
    monkeypatch.setattr(mnist_twinflow, "sample", lambda model, z, steps, style, cond:
                        calls.append((steps, style, cond["y"])) or z)
    labels = torch.arange(10)
    for method in ("flow", "rcgm", "twinflow"):
        for nfe in (1, 2, 4, 3):
            calls.clear()
            mnist_twinflow.generate(nn.Linear(1, 1), method, labels, nfe, 3, seed=0, batch=4)
            style = "mul" if method == "flow" or nfe == 3 else "any"
            assert [call[:2] for call in calls] == [(nfe, style)] * 3, (method, nfe)
            assert torch.equal(torch.cat([call[2] for call in calls]), labels)


def test_the_frechet_distance_forgets_the_previous_samples():
    torch.manual_seed(0)
    classifier = mnist_twinflow.Classifier().eval()
    real, fake, other = (torch.rand(64, 1, 28, 28) * 2 - 1 for _ in range(3))
    fid = mnist_twinflow.reference_statistics(classifier, real)
    first = mnist_twinflow.frechet_distance(fid, fake)
    assert mnist_twinflow.frechet_distance(fid, other + 0.5) != first
    assert mnist_twinflow.frechet_distance(fid, fake) == pytest.approx(first, rel=1e-6)


def test_sample_and_eval_write_into_eval_beside_their_checkpoint_unless_told():
    ckpt = os.path.join("runs", "rcgm_a", "checkpoint.pt")
    assert mnist_twinflow.parse_args(["--eval", "--ckpt", ckpt]).out == os.path.abspath("runs/rcgm_a/eval")
    assert mnist_twinflow.parse_args(["--sample", "--ckpt", ckpt, "--out", "s"]).out == "s"
    assert mnist_twinflow.parse_args(["--method", "rcgm"]).out == "out/mnist_rcgm"  # training


def test_two_process_ddp_on_cpu(data_root, tmp_path):
    """Two gloo ranks: batches of their own, gradients averaged (the same weights on both)."""
    out = tmp_path / "ddp"
    command = probe_command("mnist_twinflow", tiny(data_root, out, "--train-steps", "3", "--lr", "3e-4"))
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "world size 2, global batch 8" in run.stdout
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    ranks = check_two_ranks(out, steps=3)
    assert sorted(os.listdir(out)) == sorted(["checkpoint.pt", "grids.png", "grid_nfe1.png", "grid_nfe2.png",
                                              "grid_nfe4.png", "grid_nfe3.png", "losses.png", "metrics.json"])
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["logs"][0]["loss"] == pytest.approx((ranks[0]["losses"][0] + ranks[1]["losses"][0]) / 2)  # the mean
    assert state["opt"]["param_groups"][0]["lr"] == 3e-4  # --lr as given, not scaled by the world size


def test_batch_is_checked_per_rank(data_root, tmp_path, monkeypatch, capsys):
    """--batch 6 over two ranks is 3 a rank, and twinflow splits each rank's batch in four parts."""
    monkeypatch.setattr(mnist_twinflow, "setup_distributed", lambda args: (0, 2, torch.device("cpu")))
    torn_down = []
    monkeypatch.setattr(mnist_twinflow.dist, "destroy_process_group", lambda: torn_down.append(True))
    with pytest.raises(SystemExit):
        mnist_twinflow.main(tiny(data_root, tmp_path / "small", "--batch", "6"))
    assert "--batch 6 over 2 rank(s)" in capsys.readouterr().err and torn_down == [True]
    assert not (tmp_path / "small").exists()  # stopped before anything was written


def test_the_evaluator_is_the_same_whatever_ran_before_it(data_root, tmp_path):
    """The classifier behind accuracy and FD is the same network whatever --seed, and whatever
    random state the training before it (of one method or another) left behind."""
    weights = []
    for before, name in [(1, "a.pt"), (2, "b.pt")]:
        torch.manual_seed(before)
        torch.randn(10)  # as if a different training had run first
        args = mnist_twinflow.parser.parse_args(tiny(data_root, tmp_path / "o") + [
            "--classifier", str(tmp_path / name), "--classifier-epochs", "1", "--seed", str(before)])
        weights.append(mnist_twinflow.get_classifier(args, torch.device("cpu")).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_an_evaluator_cached_before_the_seeding_is_flagged(data_root, tmp_path, capsys):
    old = tmp_path / "old.pt"
    torch.save({"model": mnist_twinflow.Classifier().state_dict(), "test_accuracy": 0.9}, old)
    args = mnist_twinflow.parser.parse_args(tiny(data_root, tmp_path / "o") + ["--classifier", str(old)])
    mnist_twinflow.get_classifier(args, torch.device("cpu"))
    assert "predates the seeded evaluator" in capsys.readouterr().out
