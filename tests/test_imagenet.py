"""imagenet_twinflow.py end to end on CPU, offline: a tiny ImageFolder of generated images, a tiny
AutoencoderKL saved with save_pretrained and loaded back through from_pretrained, extraction to
shards, a tiny transformer trained, resumed, sampled and decoded, FID with a stand-in extractor,
and a 2-process gloo run started with torchrun."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers is imported: hub look-ups fail fast

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

import imagenet_twinflow  # noqa: E402
from ddp_probe import check_two_ranks, probe_command  # noqa: E402
from faults import counting_optimizer_steps, ctrl_c_during_call, failing_save, infinite_gradient, nan_loss  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """An ImageFolder (2 classes × 3 images, not square) and a tiny VAE (8× fewer pixels: 2×)."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["n01440764", "n01443537"]):
        os.makedirs(root / "images" / name)
        for i in range(3):
            pixels = rng.integers(0, 255, (20, 26, 3), dtype=np.uint8)
            pixels[:, :, c] = 255  # a class-dependent colour
            Image.fromarray(pixels).save(root / "images" / name / f"{i}.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(root / "vae")
    return root


def flags(assets, *extra):
    return ["--latents", str(assets / "latents"), "--vae", str(assets / "vae"), "--resolution", "16",
            "--model", "S/2", "--depth", "2", "--hidden", "32", "--heads", "2", "--batch", "8",
            "--train-steps", "4", "--workers", "0", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def latents(assets):
    imagenet_twinflow.main(flags(assets, "--extract", "--image-dir", str(assets / "images"), "--flip-copies",
                                 "--shard-size", "4"))
    return assets / "latents"


def test_extraction_writes_shards_with_labels_and_resumes(assets, latents):
    meta = json.loads((latents / "meta.json").read_text())
    assert meta["images"] == 6 and meta["shards"] == 2 and meta["num_classes"] == 2 and meta["flip_copies"]
    data, _ = imagenet_twinflow.load_latents(str(latents))
    x, y = torch.utils.data.default_collate(list(data))
    assert x.shape == (12, 4, 8, 8) and x.dtype == torch.float16  # 6 images + 6 mirrored, 16 px / 2
    assert sorted(y.tolist()) == [0] * 6 + [1] * 6
    before = {p: os.path.getmtime(latents / p) for p in ("shard_00000.pt", "shard_00001.pt")}
    second = torch.load(latents / "shard_00001.pt")
    os.remove(latents / "shard_00001.pt")  # as if the run had stopped after the first shard
    imagenet_twinflow.main(flags(assets, "--extract", "--image-dir", str(assets / "images"), "--flip-copies",
                                 "--shard-size", "4"))
    assert os.path.getmtime(latents / "shard_00000.pt") == before["shard_00000.pt"]  # not redone
    assert torch.equal(torch.load(latents / "shard_00001.pt")["latents"], second["latents"])  # seeded draws
    assert len(imagenet_twinflow.load_latents(str(latents))[0]) == 12
    with pytest.raises(SystemExit, match="holds shards made with"):  # other settings must not mix in
        imagenet_twinflow.main(flags(assets, "--extract", "--image-dir", str(assets / "images"), "--shard-size", "3"))


def test_missing_inputs_are_one_line_errors(assets, tmp_path):
    cases = [(["--extract", "--image-dir", str(tmp_path / "none")], "--image-dir"),
             (["--extract", "--image-dir", str(assets / "images"), "--vae", "no-such-org/no-such-vae",
               "--latents", str(tmp_path / "l")], "--vae no-such-org/no-such-vae: cannot load"),
             (["--latents", str(tmp_path / "empty")], "no meta.json")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            imagenet_twinflow.main(flags(assets, "--out", str(tmp_path / "o")) + extra)
        assert message in str(e.value) and "\n" not in str(e.value), extra


def test_corrupt_latents_are_one_line_errors(latents, tmp_path):
    copy = tmp_path / "latents"
    shutil.copytree(latents, copy)
    (copy / "shard_00001.pt").write_bytes(b"half a shard")
    with pytest.raises(SystemExit, match="shard_00001.pt: unreadable .*delete it"):
        imagenet_twinflow.load_latents(str(copy))
    (copy / "meta.json").write_text("{")
    with pytest.raises(SystemExit, match="meta.json: unreadable"):
        imagenet_twinflow.load_latents(str(copy))


def test_bad_flags_are_refused(assets, capsys):
    for extra, message in ((["--fid", "--ckpt", "x.pt"], "--fid needs --fid-ref"),
                           (["--hidden", "30", "--heads", "4"], "--hidden 30"), (["--sample"], "need --ckpt"),
                           (["--extract"], "--extract needs --image-dir"), (["--classes", "1,x"], "--classes"),
                           (["--order", "0"], "--order must be at least 1"),
                           (["--resolution", "24"], "--resolution 24: must be a multiple of 16"),  # 3×3 latents
                           (["--fid", "--ckpt", "x.pt", "--fid-ref", "r.npz", "--num-fid", "1"], "--num-fid must be at least 2"),
                           (["--many-steps", "4"], "have columns of their own"), (["--lr", "0"], "--lr and --clip"),
                           (["--clip", "0"], "--lr and --clip"), (["--heads", "0"], "--heads must be at least 1")):
        with pytest.raises(SystemExit) as e:
            imagenet_twinflow.main(flags(assets) + extra)
        assert e.value.code == 2 and message in capsys.readouterr().err, extra
    with pytest.raises(SystemExit):  # training reads --latents; --sample and --fid read the checkpoint only
        imagenet_twinflow.parse_args(["--train-steps", "2"])
    assert "--latents DIR is needed to train" in capsys.readouterr().err
    assert imagenet_twinflow.parse_args(["--sample", "--ckpt", "x.pt"]).latents is None


def test_the_tt_embedder_starts_as_the_t_embedder_and_the_sign_reaches_the_model():
    torch.manual_seed(0)
    model = imagenet_twinflow.DiT(depth=2, hidden=32, heads=2, channels=4, size=8, num_classes=2)
    for a, b in zip(model.t_embedder.parameters(), model.tt_embedder.parameters()):
        assert torch.equal(a, b)
    for p in model.parameters():  # adaLN-Zero starts every block as identity: perturb to see inputs
        nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    out = model(x, t, t, y)
    assert out.shape == x.shape and not torch.allclose(out, model(x, -t, -t, y))
    assert not torch.allclose(out, model(x, t, t * 0.5, y))  # the target time matters for a jump


class TinyFeatures(nn.Module):
    """A stand-in for Inception (no weights can be downloaded here)."""
    num_features = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 8))

    def forward(self, x):
        assert x.dtype == torch.uint8  # FID's protocol: 8-bit pixels, as Inception gets them
        return self.net(x.float())


class PoolingVAE:
    """A stand-in encoder that commutes with a horizontal flip: 2×2 average pooling, 4 channels."""
    config = types.SimpleNamespace(scaling_factor=1.0)

    def encode(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 2)
        latent = torch.cat([pooled, pooled[:, :1]], 1)
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(sample=lambda: latent))


def test_flip_copies_are_mirrored_left_to_right(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(imagenet_twinflow, "load_vae", lambda name, device: PoolingVAE())
    imagenet_twinflow.main(flags(assets, "--extract", "--image-dir", str(assets / "images"), "--flip-copies",
                                 "--shard-size", "4", "--latents", str(tmp_path / "latents")))
    shard = torch.load(tmp_path / "latents" / "shard_00000.pt")["latents"]  # 4 images, then their copies
    assert shard.shape[0] == 8 and not torch.equal(shard[:4], shard[:4].flip(-1))
    assert torch.equal(shard[4:], shard[:4].flip(-1))  # a flip along the width, not the height


class ScaledNoisyVAE(PoolingVAE):
    """A stand-in VAE with a scaling factor of 0.5 whose posterior draws come from torch's global RNG."""
    config = types.SimpleNamespace(scaling_factor=0.5)

    def encode(self, x):
        mean = super().encode(x).latent_dist.sample()
        draw = lambda: mean + 0.1 * torch.randn_like(mean)
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(sample=draw))


def test_extraction_scales_pixels_and_latents_and_seeds_each_shard(assets, tmp_path, monkeypatch):
    """Pixels in [−1, 1] (ADM's centre crop), latents times the VAE's scaling factor, which meta.json keeps
    for decoding, and each shard's posterior draws from a seed of its own."""
    monkeypatch.setattr(imagenet_twinflow, "load_vae", lambda name, device: ScaledNoisyVAE())
    extract = lambda: imagenet_twinflow.main(flags(assets, "--extract", "--image-dir", str(assets / "images"),
                                                   "--shard-size", "3", "--latents", str(tmp_path / "latents")))
    extract()
    assert json.loads((tmp_path / "latents" / "meta.json").read_text())["scaling_factor"] == 0.5
    crop = torchvision.transforms.Compose([  # the same crop, with the [0, 1] → [−1, 1] scaling done here
        torchvision.transforms.Resize(16, interpolation=torchvision.transforms.InterpolationMode.BICUBIC),
        torchvision.transforms.CenterCrop(16), torchvision.transforms.ToTensor()])
    folder = torchvision.datasets.ImageFolder(str(assets / "images"), transform=crop)
    pixels = torch.stack([image for image, _ in folder]) * 2 - 1
    pooled = torch.nn.functional.avg_pool2d(pixels, 2)
    means = 0.5 * torch.cat([pooled, pooled[:, :1]], 1)
    shards = [torch.load(tmp_path / "latents" / f"shard_0000{k}.pt")["latents"].float() for k in (0, 1)]
    draws = [shards[0] - means[:3], shards[1] - means[3:]]
    for draw in draws:  # the stand-in's draws are 0.5 × 0.1 × N(0, 1), stored in float16
        assert draw.abs().max() < 0.3 and 0.03 < draw.std() < 0.07
    assert not torch.allclose(draws[0], draws[1], atol=1e-2)  # shards of the same size, seeds of their own
    (tmp_path / "latents" / "shard_00001.pt").unlink()  # extracted again alone (a resume): the same draws
    torch.manual_seed(123)  # whatever the global generator held before
    extract()
    assert torch.equal(torch.load(tmp_path / "latents" / "shard_00001.pt")["latents"].float(), shards[1])


def test_the_flags_reach_the_loss_the_optimizer_and_both_emas(assets, latents, tmp_path, monkeypatch):
    seen, real = [], imagenet_twinflow.training_loss

    def spy(model, ema, x, **kwargs):
        seen.append(kwargs)
        return real(model, ema, x, **kwargs)
    monkeypatch.setattr(imagenet_twinflow, "training_loss", spy)
    run = lambda name, *extra: imagenet_twinflow.main(flags(assets, "--out", str(tmp_path / name), "--method", "rcgm",
                                                            "--kappa", "0.3", "--order", "3", "--lr", "3e-4", *extra))
    run("one", "--train-steps", "1")
    run("two", "--train-steps", "2", "--ema", "0.05", "--target-ema", "0.02")
    assert [(k["method"], k["kappa"], k["order"]) for k in seen] == [("rcgm", 0.3, 3)] * 3
    load = lambda name: torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)
    one, two = load("one"), load("two")
    assert two["opt"]["param_groups"][0]["lr"] == 3e-4 and two["opt"]["param_groups"][0]["weight_decay"] == 0
    # Step 0: decay 0, so both EMAs equal the model; step 1: min(decay, 1/11), so decays below 1/11 act as
    # given. A step moves a weight by about lr = 3e-4, so a wrong decay (1/11, or one EMA's decay for the
    # other's) is off by about 1e-5: the tolerance is far below that, and update_ema runs the same lerp.
    exact = dict(rtol=0, atol=1e-7)
    for name, value in one["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(two["ema"][name], torch.lerp(value, two["model"][name], 1 - 0.05), **exact)
            torch.testing.assert_close(two["target_ema"][name], torch.lerp(value, two["model"][name], 1 - 0.02),
                                       **exact)


def test_train_resume_sample_and_fid(assets, latents, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    imagenet_twinflow.main(flags(assets, "--out", str(straight), "--log-every", "1", "--label-dropout", "0.5"))
    imagenet_twinflow.main(flags(assets, "--out", str(resumed), "--log-every", "1", "--train-steps", "2",
                                 "--label-dropout", "0.5"))
    # not given again, --label-dropout 0.5 comes from the checkpoint (the default 0.1 would change the losses)
    record = imagenet_twinflow.main(flags(assets, "--out", str(resumed), "--log-every", "1", "--resume"))
    states = [torch.load(d / "checkpoint.pt", weights_only=False) for d in (straight, resumed)]
    logs = [state["logs"] for state in states]
    assert [row["step"] for row in logs[1]] == [0, 1, 2, 3] and logs[0] == logs[1]
    assert record["global_batch"] == 8 and record["latents"]["downsample"] == 2 and record["steps"] == 4
    for ema in ("ema", "target_ema"):  # the sampled EMA too: the losses do not depend on it
        assert all(torch.equal(states[0][ema][k], v) for k, v in states[1][ema].items()), ema

    ckpt = str(resumed / "checkpoint.pt")
    imagenet_twinflow.main(flags(assets, "--out", str(tmp_path / "s"), "--sample", "--ckpt", ckpt,
                                 "--classes", "0,1", "--per-class", "3", "--many-steps", "3"))
    for nfe in (1, 2, 4, 3):  # a row per class, --per-class columns: 16-pixel images, 2-pixel padding
        assert Image.open(tmp_path / "s" / f"grid_nfe{nfe}.png").size == (3 * 18 + 2, 2 * 18 + 2)
    with pytest.raises(SystemExit, match="the model has 2 classes"):  # classes 0 and 1; 2 is the null class
        imagenet_twinflow.main(flags(assets, "--out", str(tmp_path / "s2"), "--sample", "--ckpt", ckpt,
                                     "--classes", "0,2"))

    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 255, (20, 16, 16, 3), dtype=np.uint8))
    monkeypatch.setattr(imagenet_twinflow, "fid_features", TinyFeatures)
    result = imagenet_twinflow.main(flags(assets, "--out", str(tmp_path / "f"), "--fid", "--ckpt", ckpt,
                                          "--fid-ref", str(tmp_path / "ref.npz"), "--num-fid", "12", "--nfe", "2"))
    assert np.isfinite(result["fid"]) and result["num_samples"] == 12
    assert result["reference_statistics"] == "npz arr_0 images (20)" and result["style"] == "any"
    assert json.loads((tmp_path / "f" / "fid.json").read_text()) == result
    state = torch.load(ckpt, weights_only=False)  # the FID is the EMA's: zeroing the model changes nothing
    state["model"] = {k: torch.zeros_like(v) for k, v in state["model"].items()}
    torch.save(state, tmp_path / "zeroed.pt")
    again = imagenet_twinflow.main(flags(assets, "--out", str(tmp_path / "f0"), "--fid", "--ckpt",
                                         str(tmp_path / "zeroed.pt"), "--fid-ref", str(tmp_path / "ref.npz"),
                                         "--num-fid", "12", "--nfe", "2"))
    assert again["fid"] == result["fid"]


class ZeroVelocity(torch.nn.Module):
    """A stand-in transformer: 4 latent channels of 2×2, velocity 0 everywhere."""
    channels, size = 4, 2

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, tt, y):
        return torch.zeros_like(x)


class FirstChannels:
    """A stand-in VAE: decodes a latent to its first three channels."""
    def decode(self, latents):
        return type("Decoded", (), {"sample": latents[:, :3]})


def test_each_method_and_nfe_gets_its_sampler(monkeypatch):
    """flow: the ODE at every NFE; the any-step models jump, except at --many-steps (the ODE).
    Checked at the call generate() makes, once per batch, with the labels as conditioning."""
    calls = []
    monkeypatch.setattr(imagenet_twinflow, "sample", lambda model, z, steps, style, cond:
                        calls.append((steps, style, cond["y"].tolist())) or z)
    for method in ("flow", "rcgm", "twinflow"):
        for nfe in (1, 2, 4, 32):
            calls.clear()
            imagenet_twinflow.generate(ZeroVelocity(), FirstChannels(), {"scaling_factor": 1.0}, method,
                                       torch.arange(5), nfe, 32, torch.Generator(), batch=4)
            style = "mul" if method == "flow" or nfe == 32 else "any"
            assert calls == [(nfe, style, [0, 1, 2, 3]), (nfe, style, [4])], (method, nfe)
            assert imagenet_twinflow.sampler_style(method, nfe, 32) == style


def test_generate_undoes_the_vae_scaling_before_decoding():
    """With F = 0 the 1-NFE latents are the noise z; the stand-in VAE decodes a latent to its first
    three channels, so the images must be (z/scaling + 1)/2, clamped."""
    labels = torch.arange(5)
    images = imagenet_twinflow.generate(ZeroVelocity(), FirstChannels(), {"scaling_factor": 4.0}, "twinflow",
                                        labels, 1, 32, torch.Generator().manual_seed(0))
    z = torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, ((z[:, :3] / 4 + 1) / 2).clamp(0, 1))


def test_dropped_labels_become_the_null_class_past_the_last_real_one(assets, latents, tmp_path, monkeypatch):
    seen, real = [], imagenet_twinflow.training_loss

    def spy(*args, cond, null_cond, **kwargs):
        seen.append((cond["y"].clone(), null_cond["y"].clone()))
        return real(*args, cond=cond, null_cond=null_cond, **kwargs)
    monkeypatch.setattr(imagenet_twinflow, "training_loss", spy)
    record = imagenet_twinflow.main(flags(assets, "--out", str(tmp_path / "o"), "--label-dropout", "0.5"))
    classes = record["latents"]["num_classes"]
    labels = torch.cat([y for y, _ in seen])
    assert all((null == classes).all() for _, null in seen)  # a class of its own, not a real one
    assert (labels == classes).any() and (labels < classes).any() and labels.max() == classes


class RecordingFeatures(TinyFeatures):
    """TinyFeatures that keeps every feature row it hands to the metric."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def forward(self, x):
        out = super().forward(x)
        self.rows.append(out.detach().double())
        return out


def test_fid_uses_the_npz_statistics_when_it_has_them(assets, latents, tmp_path, monkeypatch):
    out = tmp_path / "run"
    imagenet_twinflow.main(flags(assets, "--out", str(out), "--train-steps", "2"))
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 8))
    mu_ref, sigma_ref = rng.normal(size=8), a @ a.T / 8 + 0.1 * np.eye(8)
    np.savez(tmp_path / "ref.npz", mu=mu_ref, sigma=sigma_ref,  # and images, as ADM's npz has: not to be used
             arr_0=rng.integers(0, 255, (20, 16, 16, 3), dtype=np.uint8))
    extractor, labels, real_generate = RecordingFeatures(), [], imagenet_twinflow.generate
    monkeypatch.setattr(imagenet_twinflow, "fid_features", lambda: extractor)
    monkeypatch.setattr(imagenet_twinflow, "generate", lambda model, vae, meta, method, y, *args:
                        labels.append(y) or real_generate(model, vae, meta, method, y, *args))
    result = imagenet_twinflow.main(flags(assets, "--out", str(tmp_path / "f"), "--fid", "--ckpt",
                                          str(out / "checkpoint.pt"), "--fid-ref", str(tmp_path / "ref.npz"),
                                          "--num-fid", "12", "--nfe", "3", "--many-steps", "3"))
    fake = torch.cat(extractor.rows).numpy()
    assert fake.shape == (12, 8)  # the samples only: arr_0 never went through the extractor
    assert torch.equal(torch.cat(labels), torch.arange(12) % 2)  # the 2 real classes, evenly; never the null one
    mu, sigma = fake.mean(0), np.cov(fake, rowvar=False)
    # tr (Σ1 Σ2)^½ = Σ √λ(Σ1 Σ2), torchmetrics' way; the script goes through eigh instead
    trace_sqrt = np.sqrt(np.linalg.eigvals(sigma @ sigma_ref).astype(complex)).real.sum()
    expected = ((mu - mu_ref) ** 2).sum() + np.trace(sigma) + np.trace(sigma_ref) - 2 * trace_sqrt
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    assert result["reference_statistics"] == "npz mu/sigma (precomputed statistics)" and result["style"] == "mul"
    np.savez(tmp_path / "wrong.npz", mu=mu_ref[:7], sigma=sigma_ref[:7, :7])  # statistics of other features
    np.savez(tmp_path / "none.npz", mu=mu_ref)  # neither mu and sigma nor arr_0
    for name, message in (("wrong", r"mu \(7,\) and sigma \(7, 7\) do not fit 8 features"),
                          ("none", "expected an .npz with mu and sigma, or with arr_0")):
        with pytest.raises(SystemExit, match=message) as e:
            imagenet_twinflow.main(flags(assets, "--out", str(tmp_path / "w"), "--fid", "--ckpt",
                                         str(out / "checkpoint.pt"), "--fid-ref", str(tmp_path / f"{name}.npz")))
        assert "\n" not in str(e.value)


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(assets, latents, tmp_path, monkeypatch):
    out, original = tmp_path / "o", imagenet_twinflow.training_loss
    monkeypatch.setattr(imagenet_twinflow, "training_loss", ctrl_c_during_call(original, 2))  # in step 1
    with pytest.raises(SystemExit) as e:
        imagenet_twinflow.main(flags(assets, "--out", str(out), "--log-every", "1"))
    assert e.value.code == 130
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2  # step 1 was finished
    monkeypatch.setattr(imagenet_twinflow, "training_loss", original)
    imagenet_twinflow.main(flags(assets, "--out", str(out), "--log-every", "1", "--resume"))
    imagenet_twinflow.main(flags(assets, "--out", str(tmp_path / "straight"), "--log-every", "1"))
    logs = [torch.load(d / "checkpoint.pt", weights_only=False)["logs"] for d in (out, tmp_path / "straight")]
    assert logs[0] == logs[1]


def test_resume_keeps_the_runs_settings_and_refuses_another_method_or_model(assets, latents, tmp_path, capsys):
    """A flag not given again comes from the checkpoint; one given again wins and is printed; a
    different --method, --model or architecture is refused before any training."""
    out = tmp_path / "o"
    saved = lambda: torch.load(out / "checkpoint.pt", weights_only=False)
    imagenet_twinflow.main(flags(assets, "--out", str(out), "--train-steps", "2", "--lr", "3e-4"))
    imagenet_twinflow.main(flags(assets, "--out", str(out), "--resume", "--train-steps", "3"))
    assert saved()["step"] == 3 and saved()["opt"]["param_groups"][0]["lr"] == 3e-4
    for flag, value, message in (("--method", "rcgm", "trained with --method twinflow, not rcgm"),
                                 ("--model", "B/2", "trained with --model S/2, not B/2"),
                                 ("--hidden", "64", "trained with --hidden 32, not 64")):
        with pytest.raises(SystemExit, match=message):
            imagenet_twinflow.main(flags(assets, "--out", str(out), "--resume", flag, value))
    assert saved()["step"] == 3
    capsys.readouterr()
    imagenet_twinflow.main(flags(assets, "--out", str(out), "--resume", "--lr", "1e-5"))  # flags(): --train-steps 4
    assert "--lr 1e-05 (the run's: 0.0003)" in capsys.readouterr().out
    assert saved()["opt"]["param_groups"][0]["lr"] == 1e-5 and saved()["step"] == 4
    with pytest.raises(SystemExit) as e:  # a new run would overwrite the checkpoint: --resume, or another --out
        imagenet_twinflow.main(flags(assets, "--out", str(out)))
    assert e.value.code == 2 and saved()["step"] == 4

def test_a_crash_while_saving_keeps_the_last_checkpoint(assets, latents, tmp_path, monkeypatch):
    """A full disk in the middle of a save: the previous checkpoint is untouched and resumes."""
    out = tmp_path / "o"
    imagenet_twinflow.main(flags(assets, "--out", str(out), "--train-steps", "2"))
    before = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        imagenet_twinflow.main(flags(assets, "--out", str(out), "--resume", "--train-steps", "3"))
    monkeypatch.setattr(torch, "save", real_save)
    assert (out / "checkpoint.pt").read_bytes() == before
    imagenet_twinflow.main(flags(assets, "--out", str(out), "--resume", "--train-steps", "3"))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3

def test_a_nan_loss_or_an_infinite_gradient_stops_without_touching_the_last_checkpoint(assets, latents, tmp_path,
                                                                                     monkeypatch):
    out = tmp_path / "o"
    imagenet_twinflow.main(flags(assets, "--out", str(out), "--train-steps", "2"))
    before = (out / "checkpoint.pt").read_bytes()
    for broken, message in ((nan_loss, "loss is nan at step 2"),
                            (infinite_gradient(imagenet_twinflow.training_loss),
                             "gradient norm is (inf|nan) at step 2")):
        monkeypatch.setattr(imagenet_twinflow, "training_loss", broken)
        with counting_optimizer_steps() as steps, pytest.raises(SystemExit, match=message) as e:
            imagenet_twinflow.main(flags(assets, "--out", str(out), "--resume", "--ckpt-every", "1"))
        assert "\n" not in str(e.value) and (out / "checkpoint.pt").read_bytes() == before
        assert steps == []  # stopped before the update


def test_two_process_ddp_extract_resume_and_train(assets, tmp_path):
    out, lat = tmp_path / "ddp", tmp_path / "latents"
    extract = ["--extract", "--image-dir", str(assets / "images"), "--shard-size", "2"]
    imagenet_twinflow.main(flags(assets, "--latents", str(lat), *extract))  # one process, 3 shards
    single = {k: torch.load(lat / f"shard_0000{k}.pt")["latents"] for k in (0, 2)}
    for k in (0, 2):  # both were rank 0's under `k % world`; the other rank would idle at the barrier
        os.remove(lat / f"shard_0000{k}.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for extra in (extract, ["--out", str(out)]):  # the probe keeps what each rank trained on, and its EMA
        command = probe_command("imagenet_twinflow", flags(assets, "--latents", str(lat), "--train-steps", "2",
                                                           *extra))
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        if extra is extract:  # the 2 missing shards were split over the 2 ranks: rank 0 did 1
            assert re.search(r"rank 0 shards: 100%.*\b1/1\b", run.stderr), run.stderr[-2000:]
    for k in (0, 2):  # the same posterior draws whichever rank, and world size, encodes a shard
        assert torch.allclose(torch.load(lat / f"shard_0000{k}.pt")["latents"].float(), single[k].float(), atol=1e-2)
    assert json.loads((lat / "meta.json").read_text())["shards"] == 3
    assert "world size 2, global batch 8" in run.stdout
    assert json.loads((out / "train.json").read_text())["world_size"] == 2
    check_two_ranks(out, steps=2)  # batches of their own, gradients averaged (the same weights on both)
