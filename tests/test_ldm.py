"""Latent text-to-image end to end on a tiny run: a VAE trained a few steps, the SD1-style latent
U-Net config (:runlocal, shortened) trained on its latent cache, evaluated by the shapes judge,
exported as a diffusers folder that StableDiffusionPipeline loads offline and samples the same
images from as we do (same initial latents and scheduler); and the bad input users hit. The
SD3-style (MMDiT) config's tests: test_ldm_sd3.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _ldm_fixtures import ours_images

from configs import common, shapes_ldm_unet, shapes_mmdit_flow
from diffusion import latent, tasks, workdir
from diffusion.train_state import restore_ema
from diffusion.workdir import read_config


@pytest.fixture(scope="module")
def runs(tiny_ldm):
    """(vae workdir, ldm workdir, data_dir, summary): the VAE trains 4 steps, the LDM 12 on its
    latents (tests/_ldm_fixtures.py, shared with test_adapters_train.py)."""
    return tiny_ldm


def test_latent_unet_trains_on_cached_latents(runs):
    vae_dir, ldm_dir, data_dir, summary = runs
    assert summary["checkpoints"] == [6, 12]
    records = [json.loads(x) for x in (ldm_dir / "metrics.jsonl").read_text().splitlines()]
    losses = np.array([r["loss"] for r in records if "loss" in r])
    assert np.all(np.isfinite(losses)) and losses[-2:].mean() < losses[:2].mean(), losses
    assert (ldm_dir / "samples_000012.png").exists()
    # The cache holds the VAE's posterior modes; the task scales them by 1/std ("auto").
    task = tasks.from_config(read_config(str(ldm_dir)))
    space = task.latents
    assert space.factor == 2 and space.channels == 4
    imgs = np.stack([np.full((32, 32, 3), v, np.float32) for v in (-0.5, 0.0, 0.5)])
    z = space.encode_unscaled(imgs)
    np.testing.assert_allclose(space.encode(imgs), z * space.scaling_factor, rtol=1e-6)
    vae, _ = restore_ema(read_config(str(vae_dir)), tasks.from_config(read_config(str(vae_dir))),
                         str(vae_dir))  # fmt: skip
    np.testing.assert_allclose(z, vae.encode(jnp.asarray(imgs)).mode(), atol=1e-5)


def test_eval_text2img_scores_with_the_judge(runs):
    from experiments import eval_text2img

    _, ldm_dir, data_dir, _ = runs
    prompts = [("a red circle at the center on a black background", "single"),
               ("a blue square above a green triangle on a gray background", "unseen")]  # fmt: skip
    r = eval_text2img.evaluate(str(ldm_dir), num_per_prompt=2, prompts=prompts, num_steps=3)
    assert r["checkpoint_step"] == 12 and r["num_prompts"] == 2
    assert 0.0 <= r["adherence"] <= 1.0 and set(r["adherence_by_group"]) == {"single", "unseen"}
    assert set(r["accuracy"]) >= {"count", "background", "shape1", "color1"}
    assert np.isfinite(r["fd_in_judge_features"])
    f = r["flops_per_sample"]  # 3 steps of DPM-Solver++(2M), guided: 3 batch-2 network calls
    assert f["nfe"] == 3 and f["network_call"] > 0 and f["decode"] > 0
    assert f["total"] == f["encode"] + 3 * f["network_call"] + f["decode"]
    assert (ldm_dir / "eval_text2img.png").exists()
    assert json.loads((ldm_dir / "eval_text2img.json").read_text())["adherence"] == r["adherence"]
    # The VAE ceiling: real images keep their captions (the judge reads them right); the 4-step
    # VAE's round trips are scored the same way and written.
    c = eval_text2img.vae_ceiling(str(ldm_dir), num_images=16)
    assert c["num_images"] == 16 and c["real"]["adherence"] >= 0.9
    assert 0.0 <= c["vae_round_trip"]["adherence"] <= 1.0
    assert json.loads((ldm_dir / "eval_vae_ceiling.json").read_text()) == c


def test_caption_use_errors_match_the_samplers_denoiser(runs):
    """eval_caption_use's x0 error with the own caption equals the one computed through the
    sampling path (task.denoiser at guidance 1) from the same noise, and so does the error with
    the empty prompt (tokenized here, not taken from the conditioning's null)."""
    import jax.numpy as jnp

    from diffusion import tasks
    from diffusion.train_state import restore_ema
    from diffusion.workdir import read_config
    from experiments import eval_caption_use

    _, ldm_dir, _, _ = runs
    r = eval_caption_use.caption_use(str(ldm_dir), num_examples=8, times=(0.9,))
    assert r["checkpoint_step"] == 12 and r["num_examples"] == 8 and len(r["rows"]) == 1
    cfg = read_config(str(ldm_dir))
    task = tasks.from_config(cfg)
    model, _ = restore_ema(cfg, task, str(ldm_dir))
    batch = eval_caption_use._examples(task, cfg, 8)
    x0 = jnp.asarray(batch.pop("x"))
    eps = jax.random.normal(jax.random.key(0), x0.shape, x0.dtype)
    s = task.schedule
    for row in r["rows"]:
        t = jnp.float32(row["t"])
        x_t = s.alpha(t) * x0 + s.sigma(t) * eps
        for name, cond in (("own", {k: jnp.asarray(v) for k, v in batch.items()}),
                           ("empty", {"input_ids": jnp.asarray(
                               task.conditioning.tokenizer([""] * 8))})):  # fmt: skip
            x0_hat = jax.jit(lambda x, t, c: task.denoiser(model, c, 1.0)(x, t))(x_t, t, cond)
            np.testing.assert_allclose(row[name], float(jnp.mean((x0_hat - x0) ** 2)), rtol=1e-4)
        assert row["gain"] == pytest.approx(row["empty"] / row["own"])
        assert row["reliance"] == pytest.approx(row["shuffled"] / row["own"])
    assert json.loads((ldm_dir / "eval_caption_use.json").read_text()) == r


def test_export_loads_in_diffusers_and_matches_our_samples(runs, tmp_path):
    """diffusers' StableDiffusionPipeline on the exported folder, given our initial latents and
    the exported DPMSolverMultistepScheduler (trailing), draws the images we draw (<= 2e-3), at
    guidance 1 (no unconditional pass) and 3; our pipelines, reading the folder, draw them too."""
    import torch
    from diffusers import StableDiffusionPipeline

    from diffusion import pipelines
    from tools import export_pipeline

    _, ldm_dir, _, _ = runs
    out = export_pipeline.export(str(ldm_dir), str(tmp_path / "pipe"))
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    ours_pipe = pipelines.load(out)
    prompts = ["a red circle at the center on a black background", "a purple hexagon"]
    x_T = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    for guidance in (1.0, 3.0):
        with torch.no_grad():
            want = pipe(prompts, num_inference_steps=4, guidance_scale=guidance,
                        output_type="np",
                        latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2))).images  # fmt: skip
        got = ours_images(ldm_dir, prompts, x_T, method="dpmpp_2m", num_steps=4,
                    guidance_scale=guidance, grid="trailing")  # fmt: skip
        assert want.shape == got.shape == (2, 32, 32, 3)
        assert np.abs(got - want).max() <= 2e-3, guidance
        # Our pipelines read the same folder (its scheduler: DPMSolverMultistep, trailing).
        ours = ours_pipe.text_to_image(prompts, num_steps=4, guidance_scale=guidance,
                                       latents=jnp.asarray(x_T))  # fmt: skip
        assert np.abs(np.asarray(ours) - want).max() <= 2e-3, guidance


def test_bad_input(runs, tmp_path):
    from tools import export_pipeline

    vae_dir, ldm_dir, _, _ = runs
    with pytest.raises(FileNotFoundError, match="does not exist"):
        latent.LatentSpace.load(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not a VAE"):
        latent.LatentSpace.load(str(ldm_dir))  # a diffusion run's workdir
    cfg = shapes_ldm_unet.get_config("runlocal")
    assert cfg.latents.vae == common.SHAPES_VAE  # the committed VAE by default
    cfg.latents.vae = None
    with pytest.raises(ValueError, match="latents.vae"):
        tasks.from_config(cfg)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        export_pipeline.export(str(ldm_dir), str(tmp_path / "full"))
    with pytest.raises(FileExistsError, match="not empty"):
        export_pipeline.export(str(vae_dir), str(tmp_path / "full"))  # a VAE run checks it too
    pixel = tmp_path / "pixel"  # a pixel-space text-to-image run's workdir (config only)
    pixel.mkdir()
    config = workdir.as_json(shapes_mmdit_flow.get_config("runlocal"))
    (pixel / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="latent text-to-image"):
        export_pipeline.export(str(pixel), str(tmp_path / "new"))
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".writing-*"))


def test_vae_run_exports_as_an_fp16_autoencoder_folder(runs, tmp_path):
    """A VAE workdir exports as a diffusers AutoencoderKL folder (fp16 weights, the measured
    scaling factor) that a latent config reads as it reads the workdir, and diffusers loads."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.numpy import load_file

    from tools import export_pipeline

    vae_dir, ldm_dir, _, _ = runs
    out = tmp_path / "vae16"
    export_pipeline.export(str(vae_dir), str(out), dtype="float16")
    stored = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {np.dtype("float16")}
    from_workdir = tasks.from_config(read_config(str(ldm_dir))).latents  # "auto" on the workdir
    from_folder = latent.LatentSpace.load(str(out))
    assert from_folder.scaling_factor == pytest.approx(from_workdir.scaling_factor, rel=1e-6)
    imgs = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    z16, z32 = from_folder.encode(imgs), from_workdir.encode(imgs)
    np.testing.assert_allclose(z16, z32, atol=2e-2 * np.abs(z32).max())
    assert np.abs(z16 - z32).max() > 0  # the fp16 rounding is really there
    ref = AutoencoderKL.from_pretrained(str(out)).float().eval()
    assert ref.config.scaling_factor == pytest.approx(from_folder.scaling_factor)
    with torch.no_grad():
        mode = ref.encode(torch.from_numpy(imgs).permute(0, 3, 1, 2)).latent_dist.mode()
    np.testing.assert_allclose(mode.permute(0, 2, 3, 1).numpy(), from_folder.encode_unscaled(imgs),
                               atol=1e-4)  # fmt: skip


def test_clip_bpe_tokenizer_matches_transformers_and_encodes_any_word(tmp_path):
    """The shipped shapes tokenizer is what train_clip_bpe writes from the generator's captions;
    CLIPTokenizer loads it; a word it never saw encodes as bytes (no unknown token)."""
    from transformers import CLIPTokenizer

    from diffusion.data import tokenizer

    tokenizer.train_clip_bpe(tokenizer.shapes_captions(), str(tmp_path / "bpe"))
    for name in ("vocab.json", "merges.txt"):
        shipped = tokenizer.BUILTIN["shapes"] + "/" + name
        assert (tmp_path / "bpe" / name).read_text() == open(shipped).read(), name
    ours = tokenizer.from_config({"kind": "clip", "path": "shapes", "max_length": 16})
    ref = CLIPTokenizer.from_pretrained(tokenizer.BUILTIN["shapes"])
    caption = "a red circle to the right of a blue square on a black background"
    ids = ours([caption, "a purple hexagon!"])
    assert ids.shape == (2, 16)
    # the longest caption form: <|startoftext|>, 14 words of one token each, <|endoftext|>
    assert list(ids[0]) == ref(caption).input_ids and len(ids[0]) == 16
    odd = ref.convert_ids_to_tokens(ref("purple").input_ids[1:-1])
    assert "".join(odd).replace("</w>", "") == "purple" and len(odd) > 1  # bytes / merges
    assert ref.unk_token_id not in ref("purple hexagon").input_ids[1:-1]
    with pytest.raises(FileNotFoundError, match="built-in"):
        tokenizer.from_config({"kind": "clip", "path": str(tmp_path / "none"), "max_length": 8})


def test_committed_shapes_vae_reconstructs_shapes():
    """The VAE the latent configs use by default (benchmarks/results/shapes_vae/vae) loads with
    its scaling factor and reconstructs freshly generated shapes images (held-out: 24.1 dB)."""
    from diffusion.data import shapes

    space = latent.LatentSpace.load(common.SHAPES_VAE)
    assert space.scaling_factor == pytest.approx(1.177, abs=1e-3) and space.factor == 2
    rng = np.random.default_rng(123)
    x = np.stack([shapes.make_example(rng, 32)["image"] for _ in range(16)])
    x = x.astype(np.float32) / 127.5 - 1.0
    recon = np.asarray(space.decode(space.encode(x)))
    psnr = 10 * np.log10(4.0 / np.mean((recon - x) ** 2))  # images in [-1, 1]
    assert psnr > 20, psnr
