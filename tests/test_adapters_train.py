"""Fine-tuning runs on the tiny latent text-to-image run (tests/_ldm_fixtures.py): the three
configs' :runlocal variants train end to end (shortened to 3 steps) from that base.

LoRA trains only the adapters: the checkpoint holds adapter leaves only, the base weights come
back bit-identical, and the reported count is rank * (fan_in + fan_out) per adapted layer.
DreamBooth runs with and without prior preservation, and its loss is eq. 2 of Ruiz et al.
(2023) on a hand-computed case. The ControlNet run: tests/test_controlnet_train.py.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _ldm_fixtures import FINETUNE_STEPS, finetune_run, flat_params, jit_call
from flax import nnx
from PIL import Image

from configs import shapes_dreambooth, shapes_lora
from diffusion import checkpoint, tasks
from diffusion.adapters import base, concepts, finetune, lora
from diffusion.data import shapes
from diffusion.train_state import restore_ema
from diffusion.workdir import read_config


def _saved_params(workdir) -> dict:
    """{path: array} of the trained parameters as the checkpoint holds them (read raw)."""
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        state = ckpt.restore().state
    leaves = jax.tree_util.tree_leaves_with_path(state["params"])
    path = lambda p: tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
    return {path(p)[:-1] if path(p)[-1] == "value" else path(p): v for p, v in leaves}


@pytest.fixture(scope="module")
def lora_run(tiny_ldm, tmp_path_factory):
    wd = tmp_path_factory.mktemp("lora")
    return wd, finetune_run(shapes_lora.get_config("runlocal"), "finetune", tiny_ldm, wd)


def test_lora_trains_only_the_adapters(tiny_ldm, lora_run):
    wd, summary = lora_run
    cfg = read_config(str(wd))
    _, base_model = base.load_base(str(tiny_ldm[1]))
    base_params = flat_params(base_model)

    # The count is rank * (fan_in + fan_out) for each adapted layer (kernel (..., in, out)).
    rank, want = cfg.finetune.lora.rank, 0
    for comp, targets in cfg.finetune.lora.targets.items():
        table = lora.layers(getattr(base_model, finetune.COMPONENTS[comp]))
        for name in lora.match(table, list(targets)):
            k = table[name].kernel.shape
            want += rank * (int(np.prod(k[:-1])) + k[-1])
    assert summary["trained_params"] == want > 0
    assert summary["frozen_params"] == sum(v.size for v in base_params.values())
    assert f"{want} trained" in (wd / "report.md").read_text()

    # The checkpoint holds the adapters only; the base comes back bit-identical.
    saved = _saved_params(str(wd))
    assert len(saved) and all(("lora" in p) and p[-1] in ("down", "up") for p in saved), saved
    assert sum(v.size for v in saved.values()) == want
    model, step = restore_ema(cfg, tasks.from_config(cfg), str(wd))
    assert step == FINETUNE_STEPS
    after = flat_params(model, nnx.All(nnx.Param, nnx.Not(lora.LoRAParam)))
    assert after.keys() == base_params.keys()
    for p, v in base_params.items():
        np.testing.assert_array_equal(after[p], v, err_msg=str(p))
    ups = [v for p, v in flat_params(model, lora.LoRAParam).items() if p[-1] == "up"]
    assert all(np.abs(u).max() > 0 for u in ups)  # up starts at 0; every adapter trained


def test_lora_run_exports_a_diffusers_file(lora_run, tmp_path):
    from diffusion.adapters import files

    wd, _ = lora_run
    path = finetune.export_lora(str(wd), str(tmp_path / "lora"))
    model, _ = restore_ema(read_config(str(wd)), tasks.from_config(read_config(str(wd))), str(wd))
    _, base_model = base.load_base(read_config(str(wd)).finetune.base)
    unet = nnx.clone(base_model.denoiser)
    files.load_lora(unet, path, prefix="unet")
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 4))
    ehs = jax.random.normal(jax.random.key(1), (1, 8, unet.config.cross_attention_dim))
    t = jnp.asarray([500])
    got = jit_call(lambda m: m(x, t, ehs), unet)
    want = jit_call(lambda m: m(x, t, ehs), model.denoiser)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_eval_finetune_scores_tuned_and_base_alike(tiny_ldm, lora_run):
    """eval_finetune's base scores are eval_text2img's on the base run (same prompts, seed,
    sampler); the tuned model's differ; the grid pairs base and tuned rows per prompt."""
    from experiments import eval_finetune, eval_text2img

    wd, _ = lora_run
    r = eval_finetune.evaluate(str(wd), num_per_prompt=2, num_prompts=2, standard=(2, 0, 0))
    assert r["kind"] == "new_color" and len(r["prompts"]["concept"]) == 2
    assert all(" purple " in p for p in r["prompts"]["concept"])
    standard = [(p, "single") for p in r["prompts"]["standard"]]
    s = r["sampler"]
    ref = eval_text2img.evaluate(str(tiny_ldm[1]), num_per_prompt=2, prompts=standard,
                                 method=s["method"], num_steps=s["num_steps"],
                                 guidance_scale=s["guidance"], write=False)  # fmt: skip
    assert r["base"]["standard_adherence"] == ref["adherence"]
    assert r["base"]["fd_in_judge_features"] == ref["fd_in_judge_features"]
    assert r["tuned"]["fd_in_judge_features"] != ref["fd_in_judge_features"]
    for who in ("base", "tuned"):
        assert r[who]["concept_rate"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 samples
    grid = Image.open(wd / "eval_finetune.png")
    assert grid.size[1] == 2 * 2 * (2 * 32 + 6)  # base and tuned rows of 2 prompts, 64 px
    assert r["lora_file"] == str(wd / "lora" / "pytorch_lora_weights.safetensors")
    assert os.path.exists(r["lora_file"])


def _first_batch(task, data_cfg) -> dict:
    from diffusion import data

    name, data_dir = task.dataset(data_cfg)
    return next(iter(data.make_pipeline(name, "train", batch_size=2, seed=0, data_dir=data_dir)))


def test_dreambooth_runs_with_prior_and_builds_both_datasets(tiny_ldm, tmp_path):
    """prior=True trains (class images drawn by the base model); prior=False builds the instance
    set alone (its training step is the LoRA run's)."""
    cfg = shapes_dreambooth.get_config("runlocal,prior=True")
    summary = finetune_run(cfg, "finetune", tiny_ldm, tmp_path / "prior")
    assert np.isfinite(summary["final_loss"]) and summary["checkpoints"] == [FINETUNE_STEPS]
    batch = _first_batch(tasks.from_config(read_config(str(tmp_path / "prior"))), cfg.data)
    assert all(concepts.SUBJECT_TOKEN in c for c in map(str, batch["caption"]))
    # class examples: the base model's samples for the captions without the token
    assert batch["prior_latent"].shape == batch["latent"].shape
    for c in map(str, batch["prior_caption"]):
        assert concepts.SUBJECT_TOKEN not in c and c.startswith("a square")

    cfg = shapes_dreambooth.get_config("runlocal,prior=False")
    cfg.finetune.base, cfg.data.data_dir = str(tiny_ldm[1]), str(tiny_ldm[2])
    batch = _first_batch(tasks.from_config(cfg), cfg.data)
    assert all(concepts.SUBJECT_TOKEN in c for c in map(str, batch["caption"]))
    assert "prior_latent" not in batch


def test_lora_prior_pairs_the_new_colour_with_ordinary_captions(tiny_ldm):
    """A new colour's prior: the base's samples of ordinary captions (not class prompts, which
    would still say "purple"), or (prompts "real", shapes_lora:prior) ordinary images."""
    cfg = shapes_lora.get_config("runlocal,prior")
    assert cfg.finetune.prior.prompts == "real"
    cfg.finetune.base, cfg.data.data_dir = str(tiny_ldm[1]), str(tiny_ldm[2])
    cfg.finetune.prior.prompts = "ordinary"
    task = tasks.from_config(cfg)
    batch = _first_batch(task, cfg.data)
    assert all("purple" in c for c in map(str, batch["caption"]))
    ordinary = concepts.examples("ordinary", task.prior.num_images, task.prior.seed + 1000)[1]
    assert not any("purple" in c or concepts.SUBJECT_TOKEN in c for c in ordinary)
    kinds = lambda c: sum(c.count(k) for k in shapes.SHAPES)
    assert {kinds(c) for c in concepts.examples("ordinary", 16, 0)[1]} == {1, 2}  # 1-2 shapes
    assert set(map(str, batch["prior_caption"])) <= set(ordinary)
    assert batch["prior_latent"].shape == batch["latent"].shape
    # "real": the prior's latents are the ordinary images themselves, encoded
    cfg.finetune.prior.prompts = "real"
    task = tasks.from_config(cfg)
    batch = _first_batch(task, cfg.data)
    images, captions = concepts.examples("ordinary", task.prior.num_images, task.prior.seed + 1000)
    want = task.latents.encode_unscaled(images.astype(np.float32) / 127.5 - 1.0)
    for latent, caption in zip(batch["prior_latent"], map(str, batch["prior_caption"])):
        np.testing.assert_allclose(latent, want[captions.index(caption)], atol=1e-5)
    cfg.finetune.prior.prompts = "classes"
    with pytest.raises(ValueError, match=r"'class', 'ordinary', 'real'"):
        tasks.from_config(cfg)


def test_prior_preservation_loss_is_eq_2(tiny_ldm):
    """L = mean_i ||x_hat_i - x_i||^2 + weight * mean_j ||x_hat_j - x'_j||^2 on instance and
    class examples, with an x0-predicting stub network returning 0, so each term is ||x||^2."""
    cfg = shapes_dreambooth.get_config("runlocal,prior=true")
    cfg.finetune.base = str(tiny_ldm[1])
    cfg.finetune.prior.weight = 0.25
    task = tasks.from_config(cfg)
    task = dataclasses.replace(
        task, objective=dataclasses.replace(task.objective, prediction_type="x0")
    )
    object.__setattr__(task, "model_fn", lambda model, x_t, mt, cond: jnp.zeros_like(x_t))
    rng = np.random.default_rng(0)
    shape = (2, 4, 4, 4)
    raw = {
        "latent": rng.normal(size=shape),
        "prior_latent": rng.normal(size=shape) * 3,
        "caption": ["a sks square at the top"] * 2,
        "prior_caption": ["a square at the top"] * 2,
    }
    batch = task.prepare_batch(raw)
    np.testing.assert_array_equal(batch["weight"], [1, 1, 0.25, 0.25])
    x, x_cls = (task.latents.scale(raw[k].astype(np.float32)) for k in ("latent", "prior_latent"))
    want = np.mean(x**2, axis=(1, 2, 3)).mean() + 0.25 * np.mean(x_cls**2, axis=(1, 2, 3)).mean()
    loss, _ = task.loss(nnx.Module(), jax.tree.map(jnp.asarray, batch), jax.random.key(0))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
