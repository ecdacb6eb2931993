"""End-to-end runs of the shapes training configs (runlocal, shortened): each run writes >= 2
checkpoints, metrics.jsonl and a sample PNG, and its loss goes down. Also checks that the MMDiT
config's vocabulary covers every caption of the dataset (no <unk>, nothing truncated) and that
its model dimensions agree with the text encoder's."""

import json

import numpy as np
import pytest
from PIL import Image

from configs import shapes_mmdit_flow, shapes_unet_text, shapes_vae
from diffusion import data, images, tasks, train
from diffusion.train_state import restore_ema
from diffusion.workdir import read_config

ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1, "num_devices": 1}
STEPS = 12  # shorter than runlocal's 40 to keep the file fast; still two checkpoints


def _short(cfg, data_dir):
    cfg.data.data_dir = str(data_dir)
    cfg.total_steps, cfg.ckpt_every, cfg.log_every, cfg.sample.every = STEPS, STEPS // 2, 2, STEPS
    cfg.mesh = ONE_DEVICE  # 8-fake-device SPMD compiles are slow; sharding is tested elsewhere
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def _check_run(workdir, summary):
    assert summary["checkpoints"] == [STEPS // 2, STEPS]
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [STEPS // 2, STEPS]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = np.array([r["loss"] for r in records if "loss" in r])
    assert len(losses) == STEPS // 2 and np.all(np.isfinite(losses))
    last_quarter = losses[-max(len(losses) // 4, 1) :]
    assert last_quarter.mean() < losses[0], f"loss did not decrease: {losses}"
    png = Image.open(workdir / f"samples_{STEPS:06d}.png")
    assert png.size[0] > 0 and np.asarray(png).std() > 0  # not a constant image
    assert (workdir / "report.md").exists() and (workdir / "config.json").exists()
    return losses


def test_shapes_vae_runlocal(tmp_path, data_dir):
    cfg = _short(shapes_vae.get_config("runlocal"), data_dir)
    summary = train.train(cfg, str(tmp_path))
    _check_run(tmp_path, summary)
    _check_eval_autoencoder(tmp_path, data_dir)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kl"] >= 0 and r["l1"] > 0 for r in records if "kl" in r)
    # 8 images: one row of originals above one row of reconstructions, square cells.
    width, height = Image.open(tmp_path / f"samples_{STEPS:06d}.png").size
    cell = (width - 2) // images.GRID_COLUMNS
    assert height == 2 * cell + 2, (width, height)


def _check_eval_autoencoder(workdir, data_dir):
    """eval_autoencoder's numbers equal diffusers' AutoencoderKL (PyTorch) holding the same EMA
    weights on the same held-out images: encode -> posterior mode -> decode."""
    import torch
    from diffusers import AutoencoderKL

    from diffusion import models
    from experiments import eval_autoencoder

    r = eval_autoencoder.evaluate(str(workdir), "test", num_images=16, data_dir=str(data_dir))
    assert r["checkpoint_step"] == STEPS and r["num_images"] == 16
    assert (workdir / "eval_autoencoder.png").exists()
    cfg = read_config(str(workdir))
    model, _ = restore_ema(cfg, tasks.from_config(cfg), str(workdir))
    models.save_diffusers(model, str(workdir / "ema_diffusers"))
    ref = AutoencoderKL.from_pretrained(str(workdir / "ema_diffusers")).eval()
    x = eval_autoencoder.load_images("shapes/tiny", "test", 16, str(data_dir))  # (N, H, W, C)
    with torch.no_grad():
        z = ref.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist.mode()
        recon = ref.decode(z).sample.numpy().transpose(0, 2, 3, 1)
    z = z.numpy()
    np.testing.assert_allclose(r["l1"], np.mean(np.abs(recon - x)), rtol=1e-4)
    np.testing.assert_allclose(r["mse"], np.mean((recon - x) ** 2), rtol=1e-4)
    np.testing.assert_allclose(r["latent_std"], z.std(), rtol=1e-4)
    np.testing.assert_allclose(r["latent_channel_mean"], z.mean(axis=(0, 2, 3)), atol=1e-5)


def test_latent_stats_of_known_gaussian():
    from experiments.eval_autoencoder import latent_stats

    rng = np.random.default_rng(0)
    # channel stds 1 and 2, channel means 0 and 3
    z = rng.standard_normal((4000, 2, 2, 2)) * [1.0, 2.0] + [0.0, 3.0]
    s = latent_stats(z)
    np.testing.assert_allclose(s["latent_channel_mean"], [0.0, 3.0], atol=0.05)
    np.testing.assert_allclose(s["latent_channel_std"], [1.0, 2.0], rtol=0.02)
    # std over all latents: sqrt(mean of the channel variances + variance of the channel means)
    want = np.sqrt((1.0 + 4.0) / 2 + 1.5**2)
    np.testing.assert_allclose(s["latent_std"], want, rtol=0.02)
    np.testing.assert_allclose(s["scaling_factor"], 1.0 / want, rtol=0.02)


def test_paired_rows_interleaves_originals_and_reconstructions():
    o = np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1) + 1  # originals 1, 2, 3
    r = -o  # reconstructions -1, -2, -3
    got = np.asarray(images.paired_rows(o, r, ncol=2)).ravel()
    np.testing.assert_array_equal(got, [1, 2, -1, -2, 3, 0, -3, 0])


def test_shapes_mmdit_flow_runlocal(tmp_path, data_dir):
    cfg = _short(shapes_mmdit_flow.get_config("runlocal"), data_dir)
    summary = train.train(cfg, str(tmp_path))
    _check_run(tmp_path, summary)


def test_shapes_unet_text_runlocal(tmp_path, data_dir):
    """An SD1-style text-conditioned U-Net trains from its config alone, and learns (the loss
    falls: _check_run)."""
    cfg = _short(shapes_unet_text.get_config("runlocal"), data_dir)
    summary = train.train(cfg, str(tmp_path))
    _check_run(tmp_path, summary)


def test_shapes_vocabulary_covers_captions(data_dir):
    cfg = shapes_mmdit_flow.get_config("runlocal")
    task = tasks.from_config(cfg)
    text = cfg.conditioning
    loader = data.make_pipeline("shapes/tiny", "train", batch_size=256, seed=0, data_dir=data_dir)
    captions = [str(c) for c in next(iter(loader))["caption"]]
    tokens = task.conditioning.tokenizer(captions)  # (B, L)
    assert not np.any(tokens == 1), (
        "a caption word is missing from conditioning.tokenizer.vocab (<unk>)"
    )
    # Every caption keeps its <eos> (not truncated) and the longest one fills max_length.
    assert np.all(np.sum(tokens == 3, axis=1) == 1)
    assert np.all(tokens < text.text_encoder.config.vocab_size)
    assert tokens.shape[1] == text.tokenizer.max_length
    assert text.text_encoder.config.max_position_embeddings >= text.tokenizer.max_length


@pytest.mark.parametrize("variant", ["", "runlocal"])
def test_shapes_mmdit_dimensions_match_text_encoder(variant):
    cfg = shapes_mmdit_flow.get_config(variant)
    clip, dit = cfg.conditioning.text_encoder.config, cfg.model.config
    assert dit.joint_attention_dim == clip.hidden_size
    assert dit.pooled_projection_dim == clip.projection_dim
    assert (clip.bos_token_id, clip.eos_token_id, clip.pad_token_id) == (2, 3, 0)
    assert dit.pos_embed_max_size * dit.patch_size >= dit.sample_size


def test_unknown_variant_lists_valid_ones():
    for module in (shapes_vae, shapes_mmdit_flow):
        with pytest.raises(ValueError, match="runlocal"):
            module.get_config("bogus")


def test_eval_digits_on_runlocal_workdir(tmp_path, data_dir):
    from configs import digits_unet_eps
    from experiments import eval_digits

    cfg = digits_unet_eps.get_config("runlocal")
    cfg.data.data_dir = str(data_dir)
    cfg.total_steps = cfg.ckpt_every = 4
    cfg.sample.every = 0  # no training grid: the evaluation samples
    cfg.sample.num_steps = 3
    cfg.mesh = ONE_DEVICE
    train.train(cfg, str(tmp_path))
    result = eval_digits.evaluate(str(tmp_path), num_per_class=3)
    assert result["checkpoint_step"] == 4
    assert result["real_test_accuracy"] > 0.9  # the classifier itself reads real digits
    assert 0.0 <= result["sample_accuracy"] <= 1.0 and len(result["per_class_accuracy"]) == 10
    confusion = np.asarray(result["confusion"])
    assert confusion.shape == (10, 10) and np.all(confusion.sum(axis=1) == 3)
    assert np.isclose(np.trace(confusion) / 30, result["sample_accuracy"])
    assert json.loads((tmp_path / "eval_digits.json").read_text()) == result
    grid = np.asarray(Image.open(tmp_path / "eval_digits.png"))
    tile = cfg.model.config.sample_size * max(2, 32 // cfg.model.config.sample_size)
    assert grid.shape[0] == 10 * (tile + 2) + 2  # one row per class, upscaled, 2 px apart
    with pytest.raises(ValueError, match="not a class-conditional digits run"):
        tmp = tmp_path / "vae"
        tmp.mkdir()
        cfg_vae = shapes_vae.get_config("runlocal")
        (tmp / "config.json").write_text(json.dumps(cfg_vae.to_dict()))
        eval_digits.evaluate(str(tmp))
