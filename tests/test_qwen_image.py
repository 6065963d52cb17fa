"""scale_qwen_image.py on CPU, offline: a tiny random Qwen-Image pipeline (transformer, VAE, scheduler)
saved with save_pretrained and loaded through the real from_pretrained paths, a stand-in text encoder,
precompute, training with resume, a 2-process gloo FSDP2 run started with torchrun, export to a
diffusers folder, sampling through QwenImagePipeline, and --plan against a hand count."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers is imported: hub look-ups fail fast

import glob  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import scale_qwen_image as sq  # noqa: E402
from ddp_probe import check_two_ranks, probe_command  # noqa: E402
from faults import counting_optimizer_steps, ctrl_c_during_call, failing_save, infinite_gradient  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
TEXT_DIM = TINY["joint_attention_dim"]


def stand_in_text_encoder(name, device, max_text_len):
    """Caption → (a deterministic random embedding per caption, one token per word + 1), like
    Qwen-Image's encoder in shape: (B, S, joint_attention_dim), mask (B, S)."""
    def encode(captions):
        lengths = [min(len(c.split()) + 1, max_text_len) for c in captions]
        embeddings = torch.zeros(len(captions), max(lengths), TEXT_DIM)
        for i, (caption, length) in enumerate(zip(captions, lengths)):
            generator = torch.Generator().manual_seed(sum(caption.encode()) + length)
            embeddings[i, :length] = torch.randn(length, TEXT_DIM, generator=generator)
        mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
        return embeddings.to(device), mask
    return encode


@pytest.fixture(autouse=True)
def text_encoder(monkeypatch):
    monkeypatch.setattr(sq, "load_text_encoder", stand_in_text_encoder)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Qwen-Image pipeline folder and 6 image–caption pairs (a folder and a JSONL manifest)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    root = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**TINY)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    QwenImagePipeline(FlowMatchEulerDiscreteScheduler(), vae, None, None, transformer).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    os.makedirs(root / "pairs")
    lines = []
    for i, caption in enumerate(["a red square", "a blue sky at noon", "green", "two cats", "a dog", "the sea"]):
        pixels = rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)  # not square: cropped
        Image.fromarray(pixels).save(root / "pairs" / f"{i}.png")
        (root / "pairs" / f"{i}.txt").write_text(caption)
        lines.append(json.dumps({"image": f"pairs/{i}.png", "caption": caption}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def flags(assets, *extra):
    return ["--model", str(assets / "model"), "--resolution", "32", "--max-text-len", "8", "--batch", "4",
            "--device", "cpu", "--log-every", "1", "--no-bf16", *extra]


@pytest.fixture(scope="module")
def cache(assets):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sq, "load_text_encoder", stand_in_text_encoder)
        sq.main(flags(assets, "--precompute", "--data", str(assets / "pairs"), "--cache", str(assets / "cache"),
                      "--shard-size", "4", "--encode-batch", "3"))
    return assets / "cache"


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
def test_tt_embedder_starts_as_a_copy_so_tt_equal_t_is_the_pretrained_model(assets):
    from diffusers import QwenImageTransformer2DModel

    pretrained = QwenImageTransformer2DModel.from_pretrained(assets / "model", subfolder="transformer")
    model = sq.load_transformer(str(assets / "model"), torch.float32)
    for a, b in zip(model.tt_embedder.parameters(), model.time_text_embed.timestep_embedder.parameters()):
        assert torch.equal(a, b)
    torch.manual_seed(1)
    x, text, mask = torch.randn(3, 4, 64), torch.randn(3, 5, TEXT_DIM), torch.ones(3, 5, dtype=torch.long)
    t = torch.tensor([0.9, 0.5, 0.2])
    kwargs = dict(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                  img_shapes=[[(1, 2, 2)]] * 3, return_dict=False)
    with torch.no_grad():
        reference = pretrained(timestep=t, **kwargs)[0]
        assert torch.allclose(model(timestep=t, target_timestep=t, **kwargs)[0], reference, atol=1e-6)
        assert torch.allclose(model(timestep=t, **kwargs)[0], reference, atol=1e-6)  # the pipeline's call
        assert not torch.allclose(model(timestep=t, target_timestep=t * 0, **kwargs)[0], reference, atol=1e-3)
        assert not torch.allclose(model(timestep=-t, target_timestep=-t, **kwargs)[0], reference, atol=1e-3)


def test_short_jumps_reach_bf16_blocks_and_long_ones_match_fp32(assets):
    """The jump t − tt is taken in fp32 before it scales the tt embedding: in bf16, 0.5 and 0.4995
    are the same number, and the jump would be 0. The blocks still run in bf16, so what a short jump
    does is mostly rounding there (README); a long one must match the fp32 model's effect."""
    model = torch.nn.Module.to(sq.load_transformer(str(assets / "model"), torch.float32), torch.bfloat16)
    fp32 = sq.load_transformer(str(assets / "model"), torch.float32)
    torch.manual_seed(1)
    kwargs = dict(hidden_states=torch.randn(2, 4, 64), encoder_hidden_states=torch.randn(2, 3, TEXT_DIM),
                  encoder_hidden_states_mask=torch.ones(2, 3, dtype=torch.long), img_shapes=[[(1, 2, 2)]] * 2,
                  return_dict=False)
    t = torch.full((2,), 0.5)
    assert torch.equal(t.bfloat16(), (t - 0.0005).bfloat16())
    effect = lambda net, jump: (net(timestep=t, target_timestep=t - jump, **kwargs)[0]
                                - net(timestep=t, target_timestep=t, **kwargs)[0]).float().flatten()
    with torch.no_grad():
        assert (effect(model, 0.0005) != 0).float().mean() > 0.05  # measured: 0.12 of the outputs move
        long_jump = torch.corrcoef(torch.stack([effect(model, 0.3), effect(fp32, 0.3)]))[0, 1]
    assert long_jump > 0.9  # measured 0.96 (0.13 at a jump of 0.01, 0.69 at 0.1: bf16 rounding)


def test_padded_text_with_its_mask_gives_the_same_velocity(assets):
    model = sq.load_transformer(str(assets / "model"), torch.float32)
    velocity = sq.velocity_fn(model, (2, 2))
    torch.manual_seed(2)
    x, text = torch.randn(1, 4, 64), torch.randn(1, 3, TEXT_DIM)
    padded, mask = sq.pad([text[0], torch.zeros(5, TEXT_DIM)])  # the batch pads the 3 tokens to 5
    t = torch.tensor([0.7])
    with torch.no_grad():
        alone = velocity(x, t, t / 2, text, torch.ones(1, 3, dtype=torch.long))
        in_batch = velocity(x, t, t / 2, padded[:1], mask[:1])
    assert mask[0].tolist() == [1, 1, 1, 0, 0]
    assert torch.allclose(alone, in_batch, atol=1e-5)


def test_the_velocity_wrapper_meets_common_contract_and_packs_like_the_pipeline(assets):
    from diffusers import QwenImagePipeline

    model = sq.load_transformer(str(assets / "model"), torch.float32)
    velocity = sq.velocity_fn(model, (2, 2))
    x = torch.randn(2, 4, 64)
    F = velocity(x, torch.ones(2), torch.zeros(2), text=torch.randn(2, 3, TEXT_DIM),
                 text_mask=torch.ones(2, 3, dtype=torch.long))
    assert F.shape == x.shape
    latents = torch.randn(2, 16, 1, 4, 4)  # the VAE's (B, C, frames, h, w)
    packed = QwenImagePipeline._pack_latents(latents, 2, 16, 4, 4)
    assert torch.equal(QwenImagePipeline._unpack_latents(packed, 32, 32, 8), latents)


# ----------------------------------------------------------------------------------------------
# --plan
# ----------------------------------------------------------------------------------------------
def hand_count(D, J, head_dim, out=16, patch=2, in_channels=64):
    linear = lambda i, o: i * o + o  # noqa: E731
    block = (2 * linear(D, 6 * D)  # img_mod, txt_mod
             + 8 * linear(D, D)  # q, k, v, out for the image and the text stream
             + 4 * head_dim  # RMSNorm of q, k (both streams)
             + 2 * (linear(D, 4 * D) + linear(4 * D, D)))  # img_mlp, txt_mlp
    time = linear(256, D) + linear(D, D)
    root = (linear(in_channels, D) + J + linear(J, D) + 2 * time  # img_in, txt_norm, txt_in, t and tt
            + linear(D, 2 * D) + linear(D, patch * patch * out))  # norm_out, proj_out
    frozen = 2 * linear(D, D) + head_dim + linear(D, 4 * D) + linear(4 * D, D)  # the last block's text q and output
    return block, root, frozen


def test_plan_matches_a_hand_count_for_a_tiny_config(assets):
    result = sq.main(flags(assets, "--plan", "2", "--batch", "8"))
    block, root, frozen = hand_count(D=32, J=TEXT_DIM, head_dim=16)
    params = 2 * block + root
    assert (result["block"], result["parameters"]) == (block, params)
    assert result["trainable"] == params - frozen
    rows = result["rows"]
    assert rows["master weights (fp32, sharded)"] == 4 * params / 2
    assert rows["AdamW state (2 × fp32, sharded)"] == 8 * (params - frozen) / 2
    assert sum(v for k, v in rows.items() if k.startswith("EMA")) == 0  # --ema 0: no copy
    assert 0 < result["activations_checkpointed"] < result["activations_full"]


def test_plan_for_the_real_config_counts_20_43b_and_fits_8_gpus_only_with_checkpointing(capsys):
    result = sq.main(["--plan", "8"])  # offline: the class defaults, which are Qwen-Image's
    block, root, frozen = hand_count(D=3072, J=3584, head_dim=128)
    assert result["parameters"] == 60 * block + root
    tt = 256 * 3072 + 3072 + 3072 * 3072 + 3072
    assert result["parameters"] - tt == 20_430_401_088  # Qwen-Image-20B as published
    assert result["total_checkpointed"] < 0.9 * 80 * 2**30 < result["total_full"]
    assert "20.43B pretrained parameters" in capsys.readouterr().out


def test_activation_extrapolation_matches_a_direct_measurement():
    config = dict(TINY, joint_attention_dim=24, num_layers=60, num_attention_heads=6, attention_head_dim=16)
    block, root = sq.activations_per_sample(config, image_tokens=100, text_tokens=20)
    one, two = (sq.saved_bytes(config, n, 6, 20, image_side=10) for n in (1, 2))
    assert block == pytest.approx(two - one, rel=1e-9) and root == pytest.approx(2 * one - two, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# --precompute
# ----------------------------------------------------------------------------------------------
def test_precompute_writes_packed_latents_and_unpadded_text_and_resumes(assets, cache):
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["shards"] == 2 and meta["pairs"] == 6 and meta["grid"] == [2, 2]
    shard = torch.load(cache / "shard_00000.pt")
    assert shard["latents"].shape == (4, 4, 64) and shard["latents"].dtype == torch.bfloat16
    assert shard["text_lengths"].tolist() == [4, 6, 2, 3]  # one token per word + 1 (the stand-in)
    assert shard["text"].shape == (4, 6, TEXT_DIM)
    assert torch.load(cache / "null.pt")["text"].shape == (1, TEXT_DIM)
    # the latents are the VAE's, normalised and packed as the pipeline does
    vae = sq.load_vae(str(assets / "model"), torch.device("cpu"))
    image = sq.center_crop(32)(Image.open(assets / "pairs" / "1.png").convert("RGB"))
    assert torch.allclose(shard["latents"][1].float(), sq.encode_images(vae, image[None])[0], atol=2e-2)
    # resumable: existing shards are kept
    mtime = os.path.getmtime(cache / "shard_00001.pt")
    os.remove(cache / "shard_00000.pt")
    sq.main(flags(assets, "--precompute", "--data", str(assets / "pairs"), "--cache", str(cache),
                  "--shard-size", "4", "--encode-batch", "3"))
    assert os.path.getmtime(cache / "shard_00001.pt") == mtime and (cache / "shard_00000.pt").exists()
    assert torch.equal(torch.load(cache / "shard_00000.pt")["latents"], shard["latents"])


def test_latent_normalisation_and_packing_invert_exactly(assets):
    """encode_images → decode_latents is the VAE's own round trip: the normalisation and the 2×2
    packing undo each other (a wrong sign, scale or layout would not)."""
    vae = sq.load_vae(str(assets / "model"), torch.device("cpu"))
    torch.manual_seed(3)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        plain = vae.decode(vae.encode(images[:, :, None]).latent_dist.mode(), return_dict=False)[0][:, :, 0]
        ours = sq.decode_latents(vae, sq.encode_images(vae, images), 32)
    assert torch.allclose(ours, ((plain + 1) / 2).clamp(0, 1), atol=1e-5)


def test_decoding_matches_the_pipelines_own(assets):
    """decode_latents against QwenImagePipeline's decoding of the same packed latents: a transformer
    whose output is zero leaves the latents as they are through the pipeline's Euler steps, so what
    it returns is its own unpacking, de-normalisation and VAE decode (a normalisation wrong the same
    way on both sides would pass the round trip above, not this)."""
    from diffusers import QwenImagePipeline

    transformer = sq.load_transformer(str(assets / "model"), torch.float32)
    torch.nn.init.zeros_(transformer.proj_out.weight), torch.nn.init.zeros_(transformer.proj_out.bias)
    pipe = QwenImagePipeline.from_pretrained(assets / "model", transformer=transformer, text_encoder=None,
                                             tokenizer=None)
    torch.manual_seed(4)
    latents = torch.randn(1, 4, 64)  # 32 px: (32/8/2)² = 4 packed 2×2 patches of 16 channels
    with torch.no_grad():
        theirs = pipe(prompt_embeds=torch.randn(1, 3, TEXT_DIM), prompt_embeds_mask=torch.ones(1, 3, dtype=torch.long),
                      latents=latents, height=32, width=32, num_inference_steps=2, output_type="pt").images
        ours = sq.decode_latents(pipe.vae, latents, 32)
    assert theirs.shape == ours.shape == (1, 3, 32, 32)
    assert torch.allclose(ours, theirs.float(), atol=1e-5)


def test_caption_dropout_puts_the_empty_prompt_in_those_rows(cache):
    data = sq.Cache(str(cache))
    x, text, mask = data.batch(torch.tensor([0, 1, 2]), torch.tensor([False, True, False]), torch.device("cpu"))
    assert x.shape == (3, 4, 64) and x.dtype == torch.float32
    shard = torch.load(cache / "shard_00000.pt")
    assert mask.sum(1).tolist() == [4, 1, 2]  # caption, empty prompt, caption
    assert torch.equal(text[1, :1], data.null) and torch.equal(text[0, :4], shard["text"][0, :4])
    assert torch.equal(text[2, :2], shard["text"][2, :2]) and not text[2, 2:].any()


def test_a_jsonl_manifest_reads_the_same_pairs_as_the_folder(assets):
    folder, manifest = sq.read_pairs(str(assets / "pairs")), sq.read_pairs(str(assets / "pairs.jsonl"))
    assert [(os.path.abspath(p), c) for p, c in folder] == [(os.path.abspath(p), c) for p, c in manifest]


def test_bad_input_is_a_one_line_error(assets, cache, trained, tmp_path, capsys):
    cases = [
        (["--precompute", "--data", str(tmp_path / "nope"), "--cache", str(tmp_path / "c")], "neither a folder"),
        (["--precompute", "--data", str(tmp_path / "nope.jsonl"), "--cache", str(tmp_path / "c")], "no such file"),
        (["--cache", str(tmp_path / "empty")], "no meta.json"),
        (["--resume", "--cache", str(cache), "--out", str(tmp_path / "fresh")], "no checkpoint"),
        (["--export", str(tmp_path / "e"), "--out", str(tmp_path / "fresh")], "no checkpoint"),
        (["--sample", "--ckpt", str(tmp_path / "nope")], "cannot load a Qwen-Image transformer"),
        (["--resume", "--cache", str(cache), "--out", str(assets / "split"), "--ema", "0.9", "--method", "rcgm",
          "--train-steps", "4"], "trained with --method twinflow"),
    ]
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n')
    cases.append((["--precompute", "--data", str(tmp_path / "bad.jsonl"), "--cache", str(tmp_path / "c")], "line 1"))
    os.makedirs(tmp_path / "nocaption")
    Image.new("RGB", (8, 8)).save(tmp_path / "nocaption" / "x.png")
    cases.append((["--precompute", "--data", str(tmp_path / "nocaption"), "--cache", str(tmp_path / "c")],
                  "no caption file"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as error:
            sq.main(flags(assets, *argv))
        assert message in str(error.value) and "\n" not in str(error.value), (argv, error.value)
    for argv, message in ((["--resolution", "40", "--plan", "1"], "multiple of 16"),
                          (["--precompute", "--data", "x"], "needs --data and --cache"),
                          (["--cache", str(cache), "--batch", "2"], "at least 4"),
                          (["--sample", "--ckpt", "x", "--nfe", "1,two"], "--nfe 1,two"),
                          (["--sample", "--ckpt", "x", "--nfe", "0,-3"], "--nfe 0,-3"),
                          (["--plan", "0"], "--plan 0"),
                          (["--sample", "--ckpt", "x", "--prompts", " | "], "at least one prompt")):
        with pytest.raises(SystemExit) as error:
            sq.main(flags(assets, *argv))
        assert error.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# Train, resume, export, sample (one process)
# ----------------------------------------------------------------------------------------------
def train_flags(assets, cache, out, steps, *extra):
    return flags(assets, "--cache", str(cache), "--out", str(out), "--train-steps", str(steps), *extra)


@pytest.fixture(scope="module")
def trained(assets, cache):
    """3 steps with an EMA, uninterrupted (a checkpoint after each); and 2 steps + resume to 3."""
    whole = sq.main(train_flags(assets, cache, assets / "whole", 3, "--ema", "0.9", "--ckpt-every", "1"))
    sq.main(train_flags(assets, cache, assets / "split", 2, "--ema", "0.9"))
    resumed = sq.main(train_flags(assets, cache, assets / "split", 3, "--ema", "0.9", "--resume"))
    return whole, resumed


def test_resume_continues_exactly(assets, cache, trained):
    whole, resumed = trained
    assert [log["step"] for log in whole] == [0, 1, 2]
    assert all(np.isfinite(log["loss"]) and {"base", "adv", "rectify"} <= set(log) for log in whole)
    assert resumed == whole  # the logs of steps 0, 1 (saved) and 2 (after the restart) all match
    steps = [os.path.basename(p) for p in sq.checkpoint_dirs(str(assets / "split"))]
    assert steps == ["step_0000002", "step_0000003"]  # --keep 2, complete directories only
    steps = [os.path.basename(p) for p in sq.checkpoint_dirs(str(assets / "whole"))]
    assert steps == ["step_0000002", "step_0000003"]  # saved after steps 1, 2 and 3: --keep 2 deleted the first
    mtime = os.path.getmtime(assets / "split" / "checkpoints" / "step_0000003" / "train_state.json")
    assert sq.main(train_flags(assets, cache, assets / "split", 3, "--resume")) == whole  # --ema: the run's
    assert os.path.getmtime(assets / "split" / "checkpoints" / "step_0000003" / "train_state.json") == mtime
    state = json.loads((assets / "split" / "checkpoints" / "step_0000003" / "train_state.json").read_text())
    assert state["step"] == 3 and state["ema"] and state["transformer_config"]["num_layers"] == 2


def test_a_corrupt_checkpoint_is_a_clear_error(assets, cache, trained, tmp_path):
    shutil.copytree(assets / "split", tmp_path / "run")
    newest = sq.checkpoint_dirs(str(tmp_path / "run"))[-1]
    for shard in glob.glob(os.path.join(newest, "*.distcp")):
        open(shard, "r+b").truncate(100)
    with pytest.raises(SystemExit, match="unreadable checkpoint"):
        sq.main(train_flags(assets, cache, tmp_path / "run", 4, "--ema", "0.9", "--resume"))
    with pytest.raises(SystemExit, match="trained with --ema 0.9, not 0.0"):  # dropping the EMA copy: refused
        sq.main(train_flags(assets, cache, assets / "split", 4, "--ema", "0", "--resume"))


def test_resume_takes_a_new_ema_decay_and_a_fresh_run_will_not_share_a_folder(assets, cache, trained, capsys):
    sq.main(train_flags(assets, cache, assets / "split", 3, "--ema", "0.95", "--resume"))  # at step 3: no step
    assert "resume with --ema 0.95 (the run's: 0.9)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # its checkpoints would sort among the old run's, and --keep delete them
        sq.main(train_flags(assets, cache, assets / "split", 4))
    assert e.value.code == 2 and "already holds a run's checkpoints" in capsys.readouterr().err
    assert sq.read_train_state(sq.checkpoint_dirs(str(assets / "split"))[-1])["seconds"] > 0  # kept over restarts
    assert sq.parse_args(["--sample", "--ckpt", "runs/export"]).out == os.path.abspath("runs/export") + "_samples"
    assert sq.parse_args(["--plan", "8", "--method", "rcgm"]).out == "out/qwen_rcgm"


def test_a_non_finite_loss_stops_with_an_error_and_keeps_the_checkpoint(assets, cache, tmp_path, monkeypatch):
    real = sq.training_loss
    calls = []

    def poisoned(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), terms) if len(calls) == 2 else (loss, terms)
    monkeypatch.setattr(sq, "training_loss", poisoned)
    with pytest.raises(SystemExit, match="loss is nan at step 1"):
        sq.main(train_flags(assets, cache, tmp_path / "run", 3, "--ckpt-every", "1"))
    assert [os.path.basename(p) for p in sq.checkpoint_dirs(str(tmp_path / "run"))] == ["step_0000001"]


def test_a_crash_while_saving_keeps_the_last_checkpoint(assets, cache, tmp_path, monkeypatch):
    """A full disk in the middle of a save: the half-written step_N.tmp/ is no checkpoint, the
    previous one resumes, and the next save clears the leftover."""
    run = tmp_path / "run"
    sq.main(train_flags(assets, cache, run, 1))
    before = sq.checkpoint_dirs(str(run))
    real_save = torch.save
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(SystemExit, match="could not write .*step_0000002.tmp .*No space left") as e:
        sq.main(train_flags(assets, cache, run, 2, "--resume"))
    assert "\n" not in str(e.value)
    monkeypatch.setattr(torch, "save", real_save)
    assert sq.checkpoint_dirs(str(run)) == before and os.path.isdir(run / "checkpoints" / "step_0000002.tmp")
    sq.main(train_flags(assets, cache, run, 2, "--resume"))
    assert sorted(os.listdir(run / "checkpoints")) == ["step_0000001", "step_0000002"]


def test_text_dropout_drops_that_share_of_captions(assets, cache, tmp_path, monkeypatch):
    drops, real = [], sq.Cache.batch
    monkeypatch.setattr(sq.Cache, "batch", lambda self, index, drop, device: drops.append(drop) or
                        real(self, index, drop, device))
    sq.main(train_flags(assets, cache, tmp_path / "run", 8, "--text-dropout", "0.25"))
    share = torch.cat(drops).float().mean()
    assert len(drops) == 8 and 0 < share < 0.5  # 32 captions at 0.25 (a flipped comparison drops 75 %)


def test_the_flags_reach_the_loss_the_optimizer_and_the_clip_and_targets_come_from_the_ema(
        assets, cache, tmp_path, monkeypatch):
    wraps, seen, optimizers, clips, emas = {}, [], [], [], []
    real_velocity_fn, real_loss, real_adamw = sq.velocity_fn, sq.training_loss, torch.optim.AdamW
    real_clip, real_update_ema = torch.nn.utils.clip_grad_norm_, sq.update_ema

    def velocity_fn(transformer, grid):  # which transformer each velocity function runs
        velocity = real_velocity_fn(transformer, grid)
        wraps[velocity] = transformer
        return velocity

    def spy(model, target_model, x, **kwargs):
        seen.append((wraps[model], wraps[target_model], kwargs))
        return real_loss(model, target_model, x, **kwargs)
    monkeypatch.setattr(sq, "velocity_fn", velocity_fn)
    monkeypatch.setattr(sq, "training_loss", spy)
    def clip_spy(params, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return real_clip(params, max_norm, *args, **kwargs)

    def update_ema_spy(ema, model, decay, *args, **kwargs):
        emas.append((ema, decay))
        return real_update_ema(ema, model, decay, *args, **kwargs)
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: optimizers.append(kw) or real_adamw(params, **kw))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_spy)
    monkeypatch.setattr(sq, "update_ema", update_ema_spy)
    sq.main(train_flags(assets, cache, tmp_path / "ema", 2, "--ema", "0.5", "--method", "rcgm", "--kappa", "0.3",
                        "--order", "3", "--rectify-weight", "0.3", "--lr", "3e-4", "--clip", "2.5"))
    assert len(optimizers) == 1 and optimizers[0]["lr"] == 3e-4 and optimizers[0].get("weight_decay") == 0
    assert clips == [2.5, 2.5] and len(seen) == 2 and [decay for _, decay in emas] == [0.5, 0.5]
    for model, target, kwargs in seen:
        assert target is emas[0][0] and target is not model  # the base targets come from the EMA copy
        given = [kwargs.get(k) for k in ("method", "kappa", "order", "rectify_weight")]
        assert given == ["rcgm", 0.3, 3, 0.3]
    seen.clear()
    sq.main(train_flags(assets, cache, tmp_path / "no_ema", 1))  # --ema 0: the model builds its own targets
    assert [target is model for model, target, _ in seen] == [True]


def test_an_infinite_gradient_stops_before_the_update(assets, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(sq, "training_loss", infinite_gradient(sq.training_loss))
    with counting_optimizer_steps() as steps, pytest.raises(SystemExit, match="gradient norm is (inf|nan) at step 0"):
        sq.main(train_flags(assets, cache, tmp_path / "run", 2, "--ckpt-every", "1"))
    assert steps == [] and sq.checkpoint_dirs(str(tmp_path / "run")) == []


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(assets, cache, trained, tmp_path, monkeypatch):
    """A scheduler's SIGTERM (or Ctrl-C) in the middle of step 1: the step is finished, step 2 is
    saved, the exit code is 130, and the resumed run matches the uninterrupted one."""
    real = sq.training_loss
    monkeypatch.setattr(sq, "training_loss", ctrl_c_during_call(real, 2, signal.SIGTERM))
    with pytest.raises(SystemExit) as error:
        sq.main(train_flags(assets, cache, tmp_path / "run", 3, "--ema", "0.9"))
    assert error.value.code == 130
    assert [os.path.basename(p) for p in sq.checkpoint_dirs(str(tmp_path / "run"))] == ["step_0000002"]
    monkeypatch.setattr(sq, "training_loss", real)
    assert sq.main(train_flags(assets, cache, tmp_path / "run", 3, "--ema", "0.9", "--resume")) == trained[0]


def test_export_loads_in_qwen_image_pipeline_and_samples_1_2_4_nfe(assets, trained, tmp_path, monkeypatch):
    from diffusers import QwenImagePipeline

    folder = sq.main(flags(assets, "--export", str(tmp_path / "export"), "--out", str(assets / "split")))
    transformer = sq.TwinFlowQwenImageTransformer.from_pretrained(tmp_path / "export", subfolder="transformer")
    assert transformer.config.num_layers == 2 and os.path.isfile(os.path.join(folder, "config.json"))
    pipe = QwenImagePipeline.from_pretrained(assets / "model", transformer=transformer, text_encoder=None,
                                             tokenizer=None)
    assert pipe.transformer is transformer
    # the exported weights are the EMA's (bf16) and the tt embedder has been trained away from its copy
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(sq.checkpoint_dirs(str(assets / "split"))[-1], tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt")
    assert torch.equal(transformer.proj_out.weight, full["ema"]["proj_out.weight"].to(torch.bfloat16).float())
    assert not torch.equal(transformer.tt_embedder.linear_2.weight,
                           transformer.time_text_embed.timestep_embedder.linear_2.weight)
    samplers, real_sample = [], sq.sample
    monkeypatch.setattr(sq, "sample", lambda velocity, noise, **how: samplers.append(how) or real_sample(velocity, noise, **how))
    written = sq.main(flags(assets, "--sample", "--ckpt", str(tmp_path / "export"), "--out", str(tmp_path / "s"),
                            "--prompts", "a red square|the sea", "--pipeline-steps", "2"))
    assert set(written) == {"nfe1", "nfe2", "nfe4", "pipeline_2steps"}
    # the authors' few-step sampler: jump to the data, re-noise to the next time of their grids
    assert [(how["steps"], how["style"], how["stochastic_ratio"], how["gap"]) for how in samplers] == [
        (1, "few", 0.0, (0.0, 0.0)), (2, "few", 1.0, (0.001, 0.6)), (4, "few", 1.0, (0.001, 0.5))]
    for name, images in written.items():
        assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
        assert os.path.isfile(tmp_path / "s" / f"{name}.png")


# ----------------------------------------------------------------------------------------------
# FSDP2: 2 processes, gloo, started with torchrun
# ----------------------------------------------------------------------------------------------
def torchrun(args):
    """Through tests/ddp_probe.py, which keeps each rank's batches in --out (checked by check_two_ranks;
    not the weights: FSDP2 gives each rank its own shards, and train() returns no EMA module)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = probe_command("scale_qwen_image", args)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_rank_fsdp2_trains_saves_shards_resumes_exactly_and_exports(assets, cache, tmp_path):
    common = ["--model", str(assets / "model"), "--cache", str(cache), "--batch", "8", "--device", "cpu",
              "--log-every", "1", "--ckpt-every", "2"]  # the defaults: bf16 compute, no EMA (the model
    # builds its own targets: no-grad forwards of the sharded model between its forward and backward)
    torchrun([*common, "--out", str(tmp_path / "whole"), "--train-steps", "3"])
    newest = sq.checkpoint_dirs(str(tmp_path / "whole"))[-1]
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(newest, "*.distcp"))) == [
        "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shards
    assert os.path.isfile(os.path.join(newest, "rng_rank1.pt"))
    whole = json.load(open(os.path.join(newest, "train_state.json")))
    assert whole["world"] == 2 and [log["step"] for log in whole["logs"]] == [0, 1, 2]
    ranks = check_two_ranks(tmp_path / "whole", steps=3, same_weights=False)  # each rank drew batches of its own
    for log, loss0, loss1 in zip(whole["logs"], ranks[0]["losses"], ranks[1]["losses"]):
        assert log["loss"] == pytest.approx((loss0 + loss1) / 2)  # the log holds the mean over ranks
    # resume from the step-2 checkpoint: step 2's loss is the uninterrupted run's
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_0000003")
    torchrun([*common, "--out", str(tmp_path / "resumed"), "--train-steps", "3", "--resume"])
    resumed = json.load(open(os.path.join(sq.checkpoint_dirs(str(tmp_path / "resumed"))[-1], "train_state.json")))
    assert resumed["logs"] == whole["logs"]
    check_two_ranks(tmp_path / "resumed", steps=1, same_weights=False)  # and still does after a resume
    # a 2-rank checkpoint resumes in one process, without FSDP
    logs = sq.main(["--model", str(assets / "model"), "--cache", str(cache), "--batch", "8", "--device", "cpu",
                    "--log-every", "1", "--out", str(tmp_path / "resumed"), "--train-steps", "4",
                    "--resume"])
    assert [log["step"] for log in logs] == [0, 1, 2, 3] and logs[:3] == whole["logs"]
    # and that one-process checkpoint resumes on 2 ranks, each with fresh random streams of its own
    torchrun([*common, "--out", str(tmp_path / "resumed"), "--train-steps", "5", "--resume"])
    check_two_ranks(tmp_path / "resumed", steps=1, same_weights=False)
    # with an EMA: a second sharded copy, updated after each step and saved with the model
    torchrun([*common, "--ema", "0.9", "--out", str(tmp_path / "ema"), "--train-steps", "2"])
    state = json.load(open(os.path.join(sq.checkpoint_dirs(str(tmp_path / "ema"))[-1], "train_state.json")))
    assert state["ema"] and state["step"] == 2 and all(np.isfinite(log["loss"]) for log in state["logs"])
    # the sharded checkpoint becomes one consolidated folder, in one process
    folder = sq.main(["--export", str(tmp_path / "export"), "--out", str(tmp_path / "whole")])
    transformer = sq.TwinFlowQwenImageTransformer.from_pretrained(os.path.dirname(folder), subfolder="transformer")
    block, root, _ = hand_count(32, TEXT_DIM, 16)
    assert sum(p.numel() for p in transformer.parameters()) == 2 * block + root
    # the sharded weights that the optimizer stepped are the ones the model runs: they moved
    pretrained = sq.load_transformer(str(assets / "model"), torch.bfloat16)
    for name in ("transformer_blocks.0.img_mlp.net.2.weight", "proj_out.weight", "tt_embedder.linear_1.weight"):
        trained, start = transformer.get_parameter(name), pretrained.get_parameter(name)
        assert trained.shape == start.shape and not torch.equal(trained, start), name


def test_the_gpu_memory_benchmark_runs_its_step_on_cpu():
    """benchmarks/qwen_step_memory.py: on CPU it runs scale_qwen_image.py's step and the plan for the
    same config (memory itself is measured only on CUDA)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "qwen_step_memory.py"), "--layers", "2", "--heads",
               "2", "--resolution", "32", "--text-len", "8", "--steps", "2", "--device", "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 1: loss" in result.stdout and "predicted: weights + gradients + AdamW" in result.stdout
    result = subprocess.run(command + ["--batch", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "needs at least 4" in result.stderr and "step 0" not in result.stdout
