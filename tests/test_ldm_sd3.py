"""The SD3-style latent text-to-image config (shapes_ldm_mmdit:runlocal) trained a few steps on
the tiny VAE's latents (tests/_ldm_fixtures.py): exported as a StableDiffusion3Pipeline folder
that diffusers samples our images from, in fp32 and fp16; the export as a fine-tuning base;
DreamBooth-LoRA on it, whose LoRA file diffusers reads; and warm starts (`init_from`)."""

import jax.numpy as jnp
import numpy as np
import pytest
from _ldm_fixtures import finetune_run, flat_params, ours_images, short
from flax import nnx

from configs import shapes_ldm_mmdit
from diffusion import tasks, train
from diffusion.adapters import base
from diffusion.train_state import init_weights, restore_ema
from diffusion.workdir import read_config


@pytest.fixture(scope="module")
def mmdit_run(tiny_ldm):
    """The SD3-style latent MMDiT config (:runlocal) trained 4 steps on the same VAE."""
    vae_dir, ldm_dir, data_dir, _ = tiny_ldm
    cfg = short(shapes_ldm_mmdit.get_config("runlocal"), data_dir, 4)
    cfg.latents.vae = str(vae_dir)
    train.train(cfg, str(ldm_dir.parent / "mmdit"))
    return ldm_dir.parent / "mmdit"


@pytest.fixture(scope="module")
def sd3_folder(mmdit_run, tmp_path_factory):
    """The MMDiT run exported as a StableDiffusion3Pipeline folder (fp32), once per module."""
    from tools import export_pipeline

    return export_pipeline.export(str(mmdit_run), str(tmp_path_factory.mktemp("x") / "sd3"))


def test_sd3_export_loads_in_diffusers_and_matches(mmdit_run, sd3_folder):
    """StableDiffusion3Pipeline (two CLIPs, no T5, max_sequence_length=0) on the exported MMDiT
    run, with our initial latents and its FlowMatchEulerDiscreteScheduler, draws our images at
    guidance 1 and 3."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(
        sd3_folder, text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )  # diffusers' documented way to load SD3 without T5
    prompts = ["a green diamond at the top on a brown background", "a cyan square"]
    x_T = np.random.default_rng(1).standard_normal((2, 16, 16, 4)).astype(np.float32)
    for guidance in (1.0, 3.0):
        with torch.no_grad():
            want = pipe(prompts, num_inference_steps=4, guidance_scale=guidance,
                        output_type="np", latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2)),
                        max_sequence_length=0).images  # fmt: skip
        got = ours_images(mmdit_run, prompts, x_T, method="euler", num_steps=4,
                          guidance_scale=guidance)  # fmt: skip
        assert want.shape == got.shape == (2, 32, 32, 3)
        assert np.abs(got - want).max() <= 2e-3, guidance


def test_dreambooth_lora_on_the_mmdit_base(tiny_ldm, mmdit_run, sd3_folder, tmp_path):
    """DreamBooth-LoRA with prior preservation from an SD3-style (MMDiT, rectified flow) run: the
    class images come from the base's flow sampler, the adapters go into the MMDiT's joint
    attention, and only they train (the base weights come back unchanged)."""
    from configs import shapes_dreambooth, shapes_lora
    from diffusion.adapters import lora

    _, _, data_dir, _ = tiny_ldm
    cfg = shapes_dreambooth.get_config("runlocal,prior=true,mmdit")
    assert cfg.finetune.prior.method == cfg.sample.method == "euler"  # the base's flow sampler
    summary = finetune_run(cfg, "finetune", (None, mmdit_run, data_dir, None), tmp_path / "db")
    assert np.isfinite(summary["final_loss"])
    cfg = read_config(str(tmp_path / "db"))
    task = tasks.from_config(cfg)
    assert task.model.class_name == "SD3Transformer2DModel" and task.schedule.family == "flow"
    tuned, _ = restore_ema(cfg, task, str(tmp_path / "db"))
    ups = {p: v for p, v in flat_params(tuned.denoiser, lora.LoRAParam).items() if p[-1] == "up"}
    names = {t.split(".")[0] for t in shapes_lora.MMDIT_TARGETS}  # to_out.0 -> ("to_out", 0)
    hit = [names & set(map(str, p)) for p in ups]
    assert all(len(h) == 1 for h in hit) and set().union(*hit) == names, list(ups)
    # up starts at 0; every adapter trained but the last block's text queries, whose outputs
    # SD3's last block discards (context_pre_only), so they get no gradient (as in diffusers)
    last = max(p[1] for p in ups)
    zero = [p for p, u in ups.items() if not np.abs(u).max() > 0]
    assert zero == [p for p in ups if p[1] == last and "add_q_proj" in p], zero
    want = flat_params(task.base()[1])
    got = flat_params(tuned, nnx.All(nnx.Param, nnx.Not(lora.LoRAParam)))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))

    # The adapters as a diffusers LoRA file ("transformer." / "text_encoder." keys):
    # StableDiffusion3Pipeline.load_lora_weights on the base's export gives our MMDiT's outputs.
    import torch
    from diffusers import StableDiffusion3Pipeline

    from diffusion.adapters import finetune

    path = finetune.export_lora(str(tmp_path / "db"), str(tmp_path / "lora"))
    pipe = StableDiffusion3Pipeline.from_pretrained(
        sd3_folder, text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32,
        local_files_only=True,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 9, 64)).astype(np.float32)
    pooled, t = (
        rng.standard_normal((2, 64)).astype(np.float32),
        np.array([300.0, 800.0], np.float32),
    )

    def ref():
        with torch.no_grad():
            out = pipe.transformer(hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                   encoder_hidden_states=torch.from_numpy(ctx),
                                   pooled_projections=torch.from_numpy(pooled),
                                   timestep=torch.from_numpy(t)).sample  # fmt: skip
        return out.numpy().transpose(0, 2, 3, 1)

    before = ref()
    pipe.load_lora_weights(path)
    want = ref()
    ours = np.asarray(tuned.denoiser(*map(jnp.asarray, (x, ctx, pooled, t))))
    assert np.abs(want - before).max() > 1e-3  # the file changed diffusers' model
    np.testing.assert_allclose(ours, want, atol=1e-4 * np.abs(want).max())

    both = read_config(str(tmp_path / "db"))
    both.finetune.lora.targets.unet = ["to_q"]
    with pytest.raises(ValueError, match="both 'unet' and 'transformer'"):
        tasks.from_config(both)


def test_sd3_export_is_a_finetuning_base(mmdit_run, sd3_folder):
    """The MMDiT run's SD3 export, as a fine-tuning base, is the run itself: same model and
    prompt layout, same weights, same token ids, same latent scale."""
    (t1, m1), (t2, m2) = base.load_base(sd3_folder), base.load_base(str(mmdit_run))
    assert t1.model == t2.model and t1.schedule == t2.schedule
    for f in ("encoder", "encoder_2", "hidden_state", "pooled_as", "context_dim", "null_tokens"):
        assert getattr(t1.conditioning, f) == getattr(t2.conditioning, f), f
    assert (
        t1.objective.prediction_type == "velocity" and t1.objective.time_density == "logit_normal"
    )
    p1, p2 = base.flat_params(m1), base.flat_params(m2)
    assert p1.keys() == p2.keys()
    for k in p1:
        np.testing.assert_array_equal(np.asarray(p1[k]), np.asarray(p2[k]), err_msg=str(k))
    prompt = ["a red circle at the top on a gray background"]
    np.testing.assert_array_equal(
        t1.conditioning.tokenizer(prompt), t2.conditioning.tokenizer(prompt)
    )
    assert t1.latents.scaling_factor == pytest.approx(t2.latents.scaling_factor)


def test_fp16_sd3_export_samples_in_diffusers_as_the_fp32_one(mmdit_run, sd3_folder, tmp_path):
    """experiments.eval_exported's diffusers sampling on an fp16 export (the committed pipeline's
    format) runs in float32 and draws the fp32 export's images to within the weights' rounding."""
    from experiments import eval_exported
    from tools import export_pipeline

    prompts = ["a red circle at the top on a gray background"]
    images = {}
    fp16 = export_pipeline.export(str(mmdit_run), str(tmp_path / "fp16"), dtype="float16")
    for dtype, folder in (("float16", fp16), (None, sd3_folder)):
        images[dtype] = eval_exported._diffusers_images(folder, prompts, 2, 3, 3.0, seed=0)
    assert images[None].shape == (1, 2, 32, 32, 3)
    diff = np.abs(images["float16"] - images[None]).max()
    assert 0 < diff < 2e-2, diff


def test_init_from_starts_at_the_trained_weights(tiny_ldm, mmdit_run, tmp_path):
    """A run with `init_from` starts from the trained run's EMA weights: at lr 0 the parameters
    never move, so the new run ends where it started (a fresh initialisation would differ)."""
    vae_dir, _, data_dir, _ = tiny_ldm
    cfg = short(shapes_ldm_mmdit.get_config("runlocal"), data_dir, 2)
    cfg.latents.vae, cfg.init_from = str(vae_dir), str(mmdit_run)
    cfg.optim.lr = 0.0
    cfg.sample.every = 0
    wd = str(tmp_path / "continued")
    train.train(cfg, wd)
    want = flat_params(base.load_base(str(mmdit_run))[1])
    got = flat_params(restore_ema(read_config(wd), tasks.from_config(read_config(wd)), wd)[0])
    assert got.keys() == want.keys()
    for path, value in want.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-6, atol=1e-7, err_msg=str(path))


def test_init_from_a_model_of_another_structure_is_refused(tiny_ldm):
    vae_dir, ldm_dir, data_dir, _ = tiny_ldm
    cfg = shapes_ldm_mmdit.get_config("runlocal")
    cfg.latents.vae, cfg.data.data_dir = str(vae_dir), str(data_dir)
    with pytest.raises(ValueError, match=r"not this config.s .*context_embedder.*conv_in"):
        init_weights(tasks.from_config(cfg), str(ldm_dir))  # a U-Net run into an MMDiT
