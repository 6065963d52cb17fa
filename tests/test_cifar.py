"""cifar_twinflow.py on a tiny CIFAR-10 written in torchvision's pickle layout, so the real loader runs.
Only the test patches torchvision's md5 check (the tiny files cannot match the real checksums)."""
import json
import os
import pickle
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import cifar_twinflow
from ddp_probe import check_two_ranks, probe_command
from faults import counting_optimizer_steps, ctrl_c_during_call, failing_save, infinite_gradient, nan_loss


def write_cifar(root, per_batch=8, n_test=8, seed=0):
    """cifar-10-batches-py/ with five training batches, a test batch and the metadata."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return root


@pytest.fixture
def data_root(tmp_path_factory, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    return write_cifar(str(tmp_path_factory.mktemp("cifar")))


def tiny(data_root, out, *extra):
    return ["--data-root", data_root, "--no-download", "--out", str(out), "--channels", "32", "--mult", "1,2",
            "--blocks", "1", "--attn-res", "16", "--batch", "8", "--train-steps", "3", "--many-steps", "3",
            "--device", "cpu", *extra]


def test_loader_reads_the_pickle_layout_and_flips(data_root):
    images, labels = cifar_twinflow.load_cifar(data_root, train=True, download=False)
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.uint8 and len(labels) == 40
    x = cifar_twinflow.to_model_range(images)
    assert x.min() >= -1 and x.max() <= 1
    torch.manual_seed(0)
    flipped = cifar_twinflow.to_model_range(images, flip=True)
    same = [torch.equal(a, b) for a, b in zip(flipped, x)]
    mirrored = [torch.equal(a, b.flip(2)) for a, b in zip(flipped, x)]
    assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 40


def test_loader_keeps_rows_columns_and_channels_and_maps_0_255_to_minus_1_1(tmp_path, monkeypatch):
    """A pickle row is channel-major (R, G, B planes of 32 × 32, row by row): red rises along the columns,
    green down the rows, blue is 255. The loader gives (N, 3, H, W) uint8 and the model range is
    pixel/127.5 − 1, so 0 → −1 and 255 → 1."""
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    root = write_cifar(str(tmp_path), per_batch=1, n_test=1)
    rows, columns = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    image = np.stack([columns * 8, rows * 8, np.full((32, 32), 255)]).astype(np.uint8)
    with open(os.path.join(root, "cifar-10-batches-py", "data_batch_1"), "wb") as f:
        pickle.dump({"data": image.reshape(1, 3072), "labels": [3]}, f)
    images, labels = cifar_twinflow.load_cifar(root, train=True, download=False)
    assert torch.equal(images[0], torch.from_numpy(image)) and labels[0] == 3
    x = cifar_twinflow.to_model_range(images[:1])
    assert x[0, 2].eq(1).all() and x[0, 0, :, 0].eq(-1).all()
    torch.testing.assert_close(x[0, 0, 5, 7], torch.tensor(7 * 8 / 127.5 - 1))


def test_missing_data_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        cifar_twinflow.main(tiny(str(tmp_path / "empty"), tmp_path / "o"))
    assert str(e.value).startswith("error: --data-root") and "\n" not in str(e.value)


def test_bad_flags_are_refused(data_root, tmp_path):
    for flags in (["--kappa", "0.5"], ["--channels", "20"], ["--mult", "1,x"], ["--fid"], ["--batch", "2"],
                  ["--channels", "224", "--attn-res", "32"], ["--mult", "1,7"], ["--num-fid", "1"], ["--target-ema", "1"],
                  ["--many-steps", "2"], ["--lr", "0"], ["--clip", "-1"], ["--dropout", "1.5"]):
        with pytest.raises(SystemExit) as e:
            cifar_twinflow.main(tiny(data_root, tmp_path / "o") + flags)
        assert e.value.code == 2, flags


def test_the_unet_keeps_shapes_and_sees_the_sign_of_t():
    torch.manual_seed(0)
    for mult, attn in (((1, 2, 2, 2), (16,)), ((1, 2), ())):
        model = cifar_twinflow.UNet(32, mult, 1, attn, 0.0, num_classes=10)
        for p in model.parameters():  # the zero-initialised convs would hide the time input
            nn.init.normal_(p, std=0.05)
        x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.arange(2)
        assert model(x, t, t, y).shape == x.shape
        assert not torch.allclose(model(x, t, t, y), model(x, -t, -t, y))


@pytest.mark.parametrize("flags", [[], ["--class-cond", "--kappa", "0.5"]], ids=["uncond", "cond-kappa"])
def test_training_writes_checkpoint_grids_and_record(data_root, tmp_path, flags):
    out = tmp_path / "run"
    result = cifar_twinflow.main(tiny(data_root, out, *flags))
    for name in ["checkpoint.pt", "grids.png", "grid_nfe1.png", "grid_nfe3.png", "losses.png", "train.json"]:
        assert (out / name).stat().st_size > 0, name
    record = json.loads((out / "train.json").read_text())
    assert record["global_batch"] == 8 and record["steps"] == 3 and result["parameters"] > 0


def test_targets_come_from_the_short_ema_and_samples_from_the_long_one(data_root, tmp_path, monkeypatch):
    used = []

    def spy(model, ema_model, x, **kwargs):
        used.append(ema_model)
        return common_training_loss(model, ema_model, x, **kwargs)
    common_training_loss = cifar_twinflow.training_loss
    monkeypatch.setattr(cifar_twinflow, "training_loss", spy)
    cifar_twinflow.main(tiny(data_root, tmp_path / "o", "--target-ema", "0.05"))  # (below the warm-up's 1/11)
    state = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=False)
    assert state["config"]["ema"] == 0.9999 and state["config"]["target_ema"] == 0.05
    target = {k: v.cpu() for k, v in used[-1].state_dict().items()}
    assert all(torch.equal(target[k], v) for k, v in state["target_ema"].items())
    distance = lambda name: sum((state[name][k].float() - v.float()).square().sum() for k, v in state["model"].items())
    assert distance("target_ema") < distance("ema")  # the 0.05 EMA follows the model; the 0.9999 one lags


def test_training_batches_are_flipped_at_random(data_root, tmp_path, monkeypatch):
    """Every training image dark on the left, bright on the right: mirrored ones reach the loss too."""
    folder = os.path.join(data_root, "cifar-10-batches-py")
    images = np.zeros((8, 3, 32, 32), np.uint8)
    images[..., 16:] = 255
    for i in range(1, 6):
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            pickle.dump({"data": images.reshape(8, 3072), "labels": list(range(8))}, f)
    seen, real = [], cifar_twinflow.training_loss

    def spy(model, ema_model, x, **kwargs):
        seen.append(x.detach().clone())
        return real(model, ema_model, x, **kwargs)
    monkeypatch.setattr(cifar_twinflow, "training_loss", spy)
    cifar_twinflow.main(tiny(data_root, tmp_path / "o"))
    left_bright = (torch.cat(seen)[..., :16].mean((1, 2, 3)) > 0).float().mean()
    assert 0 < left_bright < 1  # some mirrored, some not (24 images)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(data_root, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cifar_twinflow.main(tiny(data_root, straight, "--log-every", "1", "--train-steps", "4"))
    cifar_twinflow.main(tiny(data_root, resumed, "--log-every", "1", "--train-steps", "2"))
    halfway = torch.load(resumed / "checkpoint.pt", weights_only=False)
    torch.save({**halfway, "seconds": 1000.0}, resumed / "checkpoint.pt")  # as if the first 2 steps took 1000 s
    started = time.time()
    cifar_twinflow.main(tiny(data_root, resumed, "--log-every", "1", "--train-steps", "4", "--resume"))
    states = [torch.load(d / "checkpoint.pt", weights_only=False) for d in (straight, resumed)]
    assert 1000 < states[1]["seconds"] <= 1000 + time.time() - started  # the training time adds up
    logs = [state["logs"] for state in states]
    assert [row["step"] for row in logs[1]] == [0, 1, 2, 3] and logs[0] == logs[1]
    for ema in ("ema", "target_ema"):  # the losses depend on the model and the target EMA, not the sampled one
        assert all(torch.equal(states[0][ema][k], v) for k, v in states[1][ema].items()), ema
    with pytest.raises(SystemExit, match="trained with --mult"):
        cifar_twinflow.main(tiny(data_root, resumed, "--mult", "1,2,2", "--resume"))


def test_the_ema_builds_its_targets_without_dropout(data_root, tmp_path, monkeypatch):
    modes = []

    def record(model, ema, *args, **kwargs):
        modes.append((model.training, ema.training, kwargs["rectify_with_ema"]))
        return original(model, ema, *args, **kwargs)

    original = cifar_twinflow.training_loss
    monkeypatch.setattr(cifar_twinflow, "training_loss", record)
    cifar_twinflow.main(tiny(data_root, tmp_path / "o", "--dropout", "0.1", "--train-steps", "1"))
    assert modes == [(True, False, True)]  # the model trains with dropout; the EMA's targets, and Δv, have none
    modes.clear()
    cifar_twinflow.main(tiny(data_root, tmp_path / "no", "--dropout", "0", "--train-steps", "1"))
    assert modes == [(True, False, False)]  # without dropout Δv comes from the model, as the authors do


def test_class_labels_the_null_class_and_the_clip_reach_the_update(data_root, tmp_path, monkeypatch):
    seen, clips, real_loss, real_clip = [], [], cifar_twinflow.training_loss, torch.nn.utils.clip_grad_norm_

    def spy(model, ema, x, **kwargs):
        seen.append((x.clone(), kwargs["cond"]["y"].clone(), kwargs["null_cond"]["y"].clone(), kwargs["kappa"]))
        return real_loss(model, ema, x, **kwargs)

    def clip_spy(params, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return real_clip(params, max_norm, *args, **kwargs)
    monkeypatch.setattr(cifar_twinflow, "training_loss", spy)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_spy)
    cifar_twinflow.main(tiny(data_root, tmp_path / "o", "--class-cond", "--label-dropout", "0.25", "--kappa", "0.3",
                             "--clip", "2.5", "--batch", "32"))
    assert all((null == 10).all() and kappa == 0.3 for _, _, null, kappa in seen)  # guidance reads the null class
    labels = torch.cat([y for _, y, _, _ in seen])
    assert 0.1 < (labels == 10).float().mean() < 0.45  # label dropout 0.25 to the null class
    # Each kept label is its own image's: find each training image (or its flip) among the dataset's.
    images, dataset_labels = cifar_twinflow.load_cifar(data_root, train=True, download=False)
    images = images.float() / 127.5 - 1
    x = torch.cat([x for x, _, _, _ in seen])
    same = lambda a: (a[:, None] - images[None]).abs().flatten(2).amax(2) < 1e-5  # (batch, dataset)
    match = same(x) | same(x.flip(3))
    assert (match.sum(1) == 1).all()  # every row is one dataset image, flipped or not
    found = torch.as_tensor(dataset_labels)[match.float().argmax(1)]
    kept = labels != 10
    assert kept.sum() > 40 and torch.equal(labels[kept], found[kept])
    assert clips == [2.5] * 3


def test_corrupt_checkpoint_is_a_clear_error(data_root, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        cifar_twinflow.main(tiny(data_root, tmp_path / "o", "--sample", "--ckpt", str(tmp_path / "bad.pt")))


def test_resume_keeps_the_runs_settings_and_refuses_another_method_or_preset(data_root, tmp_path, capsys):
    """A flag not given again comes from the checkpoint; one given again wins and is printed; a
    different --method or --preset is refused before any training."""
    out = tmp_path / "o"
    saved = lambda: torch.load(out / "checkpoint.pt", weights_only=False)
    cifar_twinflow.main(tiny(data_root, out, "--train-steps", "2", "--lr", "3e-4", "--target-ema", "0.95"))
    cifar_twinflow.main(tiny(data_root, out, "--resume", "--train-steps", "3"))
    assert saved()["step"] == 3 and saved()["config"]["target_ema"] == 0.95
    assert saved()["opt"]["param_groups"][0]["lr"] == 3e-4
    for flag, value, message in (("--method", "rcgm", "trained with --method twinflow, not rcgm"),
                                 ("--preset", "gpu", "trained with --preset cpu, not gpu")):
        with pytest.raises(SystemExit, match=message):
            cifar_twinflow.main(tiny(data_root, out, "--resume", "--train-steps", "4", flag, value))
    assert saved()["step"] == 3
    capsys.readouterr()
    cifar_twinflow.main(tiny(data_root, out, "--resume", "--train-steps", "4", "--lr", "1e-5"))
    assert "resume with --train-steps 4 (the run's: 3), --lr 1e-05 (the run's: 0.0003)" in capsys.readouterr().out
    assert saved()["opt"]["param_groups"][0]["lr"] == 1e-5 and saved()["step"] == 4
    with pytest.raises(SystemExit) as e:  # a new run would overwrite the checkpoint: --resume, or another --out
        cifar_twinflow.main(tiny(data_root, out, "--train-steps", "2"))
    assert e.value.code == 2 and saved()["step"] == 4

def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(data_root, tmp_path, monkeypatch):
    original = cifar_twinflow.training_loss
    monkeypatch.setattr(cifar_twinflow, "training_loss", ctrl_c_during_call(original, 2))  # in step 1
    with pytest.raises(SystemExit) as e:
        cifar_twinflow.main(tiny(data_root, tmp_path / "o", "--log-every", "1"))
    assert e.value.code == 130
    assert torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=False)["step"] == 2  # step 1 was finished
    monkeypatch.setattr(cifar_twinflow, "training_loss", original)
    cifar_twinflow.main(tiny(data_root, tmp_path / "o", "--log-every", "1", "--resume"))
    cifar_twinflow.main(tiny(data_root, tmp_path / "straight", "--log-every", "1"))
    logs = [torch.load(d / "checkpoint.pt", weights_only=False)["logs"] for d in (tmp_path / "o", tmp_path / "straight")]
    assert logs[0] == logs[1]


def test_a_crash_while_saving_keeps_the_last_checkpoint(data_root, tmp_path, monkeypatch):
    """A full disk in the middle of a save: the previous checkpoint is untouched and resumes."""
    out = tmp_path / "o"
    cifar_twinflow.main(tiny(data_root, out, "--train-steps", "2"))
    before = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        cifar_twinflow.main(tiny(data_root, out, "--resume", "--train-steps", "3"))
    monkeypatch.setattr(torch, "save", real_save)
    assert (out / "checkpoint.pt").read_bytes() == before
    cifar_twinflow.main(tiny(data_root, out, "--resume", "--train-steps", "3"))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3

def test_a_nan_loss_or_an_infinite_gradient_stops_without_touching_the_last_checkpoint(data_root, tmp_path,
                                                                                     monkeypatch):
    out = tmp_path / "o"
    cifar_twinflow.main(tiny(data_root, out, "--train-steps", "2"))
    before = (out / "checkpoint.pt").read_bytes()
    for broken, message in ((nan_loss, "loss is nan at step 2"),
                            (infinite_gradient(cifar_twinflow.training_loss), "gradient norm is (inf|nan) at step 2")):
        monkeypatch.setattr(cifar_twinflow, "training_loss", broken)
        with counting_optimizer_steps() as steps, pytest.raises(SystemExit, match=message) as e:
            cifar_twinflow.main(tiny(data_root, out, "--resume", "--ckpt-every", "1"))
        assert "\n" not in str(e.value) and (out / "checkpoint.pt").read_bytes() == before
        assert steps == []  # stopped before the update


def write_flat_colour_cifar(root, per_batch=16):
    """The same layout, but every image one flat colour (the colour of its class): a task that
    a CPU starts to learn within 120 steps, unlike the random pixels above."""
    colours = np.random.default_rng(0).integers(0, 256, (10, 3), dtype=np.uint8)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    labels = [i % 10 for i in range(per_batch)]
    images = np.repeat(colours[labels][:, :, None], 32 * 32, axis=2).reshape(per_batch, 3072)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": images, "labels": labels}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return root


def test_a_short_training_flattens_the_one_step_samples_of_flat_images(tmp_path, monkeypatch):
    """On flat-colour images (spatial std 0) the one-step samples start as noise and must flatten.
    Measured (CPU, --lr 2e-3, --seed 0, 1, 2; the test runs seed 0): the spatial std of 64 one-step
    samples goes from 0.69, 0.67, 0.69 after 1 step to 0.25, 0.22, 0.28 after 120 (0.33 to 0.41 of
    the start's). At 80 steps and lr 3e-3 it was still at 0.66 to 0.73 of the start's.
    This checks that the training learns, not that TwinFlow's one-step samples are diverse: after
    120 steps their mean colours spread 0.05 (std across samples; the ten classes' colours: 0.61),
    so they sit near the data's mean colour, which is where a flow model's single step would go too."""
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    root = write_flat_colour_cifar(str(tmp_path / "data"))

    def one_step_spatial_std(steps):
        out = tmp_path / f"run{steps}"
        cifar_twinflow.main(tiny(root, out, "--lr", "2e-3", "--train-steps", str(steps)))
        state = torch.load(out / "checkpoint.pt", weights_only=False)
        model = cifar_twinflow.build_model(state["config"])
        model.load_state_dict(state["ema"])
        samples = cifar_twinflow.generate(model.eval(), "twinflow", torch.zeros(64, dtype=torch.long), 1, 3,
                                          torch.Generator().manual_seed(1))
        return samples.flatten(2).std(2).mean().item()  # per image and channel, over the 32×32 pixels

    start, trained = one_step_spatial_std(1), one_step_spatial_std(120)
    assert trained < 0.6 * start, (start, trained)


class TinyFeatures(nn.Module):
    """A stand-in for Inception (no weights can be downloaded here): 16 fixed random features."""
    num_features = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(3 * 8 * 8, 16))

    def forward(self, x):
        assert x.dtype == torch.uint8  # FID's protocol: 8-bit pixels, as Inception gets them
        return self.net(x.float())


def test_samples_are_rounded_to_the_pixel_levels_the_data_has():
    levels = torch.arange(256)
    assert torch.equal(cifar_twinflow.to_uint8(levels / 127.5 - 1), levels.to(torch.uint8))
    assert torch.equal(cifar_twinflow.to_uint8(torch.tensor([-3.0, 3.0, 0.999 / 127.5 - 1])),
                       torch.tensor([0, 255, 1], dtype=torch.uint8))  # clamped; rounded, not truncated


def test_fid_code_path_with_a_stand_in_feature_extractor(data_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cifar_twinflow.main(tiny(data_root, out))
    monkeypatch.setattr(cifar_twinflow, "fid_features", TinyFeatures)
    updates, generated, real_generate = [], [], cifar_twinflow.generate

    class RecordingFID(cifar_twinflow.FrechetInceptionDistance):
        def update(self, imgs, real):
            updates.append((imgs.clone(), real))
            return super().update(imgs, real)
    monkeypatch.setattr(cifar_twinflow, "FrechetInceptionDistance", RecordingFID)
    monkeypatch.setattr(cifar_twinflow, "generate", lambda *args: generated.append(real_generate(*args)) or generated[-1])
    result = cifar_twinflow.main(tiny(data_root, tmp_path / "fid", "--fid", "--ckpt", str(out / "checkpoint.pt"),
                                      "--nfe", "2", "--num-fid", "24"))
    saved = json.loads((tmp_path / "fid" / "fid.json").read_text())
    assert saved == result and np.isfinite(saved["fid"]) and saved["fid"] > 0
    # every training image as the reference; exactly --num-fid samples, rounded to pixel levels
    real = torch.cat([imgs for imgs, is_real in updates if is_real])
    fake = torch.cat([imgs for imgs, is_real in updates if not is_real])
    assert torch.equal(real, cifar_twinflow.load_cifar(data_root, train=True, download=False)[0])
    assert torch.equal(fake, cifar_twinflow.to_uint8(torch.cat(generated))) and len(fake) == 24
    # The FID is the EMA's, against the training split: zeroing the trained model and the target EMA
    # changes nothing
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    for name in ("model", "target_ema"):
        state[name] = {k: torch.zeros_like(v) for k, v in state[name].items()}
    torch.save(state, tmp_path / "zeroed.pt")
    splits, real_load = [], cifar_twinflow.load_cifar
    monkeypatch.setattr(cifar_twinflow, "load_cifar", lambda root, train, **kw: splits.append(train) or
                        real_load(root, train, **kw))
    again = cifar_twinflow.main(tiny(data_root, tmp_path / "fid0", "--fid", "--ckpt", str(tmp_path / "zeroed.pt"),
                                     "--nfe", "2", "--num-fid", "24"))
    assert again["fid"] == saved["fid"] and splits == [True]
    assert saved["nfe"] == 2 and saved["num_samples"] == 24 and saved["weights"] == "EMA 0.9999"
    assert saved["style"] == "any" and saved["seed"] == 0 and not (tmp_path / "fid" / "fid.json.tmp").exists()
    many = cifar_twinflow.main(tiny(data_root, tmp_path / "fid3", "--fid", "--ckpt", str(out / "checkpoint.pt"),
                                    "--nfe", "3", "--num-fid", "8"))  # --many-steps 3: the ODE, for every model
    assert many["style"] == "mul"


def test_each_method_and_nfe_gets_its_sampler(monkeypatch):
    """flow: the ODE at every NFE; the any-step models jump, except at --many-steps (the ODE)."""
    calls = []
    monkeypatch.setattr(cifar_twinflow, "sample", lambda model, z, steps, style, cond: calls.append((steps, style)) or z)
    model = nn.Linear(1, 1)
    model.label = None  # unconditional
    for method in ("flow", "rcgm", "twinflow"):
        for nfe in (1, 2, 4, 3):
            calls.clear()
            cifar_twinflow.generate(model, method, torch.zeros(5), nfe, 3, torch.Generator(), batch=4)
            style = "mul" if method == "flow" or nfe == 3 else "any"
            assert calls == [(nfe, style)] * 2, (method, nfe)


def test_every_grid_column_starts_from_the_same_noise(data_root, tmp_path, monkeypatch):
    cifar_twinflow.main(tiny(data_root, tmp_path / "run"))
    calls, real_generate = [], cifar_twinflow.generate
    monkeypatch.setattr(cifar_twinflow, "generate", lambda model, method, labels, nfe, many_steps, generator:
                        calls.append((nfe, generator.get_state())) or
                        real_generate(model, method, labels, nfe, many_steps, generator))
    cifar_twinflow.main(tiny(data_root, tmp_path / "s", "--sample", "--ckpt", str(tmp_path / "run" / "checkpoint.pt")))
    assert [nfe for nfe, _ in calls] == [1, 2, 4, 3] and all(torch.equal(calls[0][1], state) for _, state in calls)


def test_two_process_ddp_on_cpu(data_root, tmp_path):
    """Two gloo ranks: batches of their own, gradients averaged (the same weights on both)."""
    out = tmp_path / "ddp"
    command = probe_command("cifar_twinflow", tiny(data_root, out), skip_md5=True)
    run = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "world size 2, global batch 8" in run.stdout
    check_two_ranks(out, steps=3)
