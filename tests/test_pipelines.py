"""Pipeline API on the tiniest folder (pixel-space 1-layer MMDiT, one CLIP, the layout of the
project's own exports): every sampler through text_to_image, one program whatever num_steps,
prompt travel, Composable Diffusion, hi-res fix, int8 weights, sharded vs single device, and the
bad-input errors of issue 12."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _pipeline_fixtures import tiny_folder  # noqa: F401

from diffusion import pipelines, samplers
from diffusion.pipelines import extras, programs, quantize

KW = dict(max_sequence_length=8, guidance_scale=1.0)


@pytest.fixture(scope="module")
def pipe(tiny_folder):  # noqa: F811
    return pipelines.load(tiny_folder)


def test_loads_the_project_export_layout(pipe):
    assert isinstance(pipe, pipelines.StableDiffusion3Pipeline)
    assert pipe.vae is None and pipe.text_encoder_2 is None and pipe.text_encoder_3 is None
    assert pipe.transformer is pipe.denoiser and pipe.tokenizer.model_max_length == 16
    assert (pipe.scheduler.method, pipe.scheduler.prediction_type) == ("euler", "velocity")
    assert pipe.default_size() == (8, 8)


def test_every_sampler_runs_through_text_to_image(pipe):
    for method in sorted(samplers.SAMPLERS):
        if samplers.get(method).default_grid in samplers.grids.DIFFUSERS_ONLY:
            # e.g. lcm: its timesteps index a DDPM table, which this flow model does not have
            with pytest.raises(ValueError, match="discrete"):
                pipe.text_to_image("a cat", method=method, num_steps=2, rng=1, **KW)
            continue
        out = pipe.text_to_image("a cat", method=method, num_steps=2, rng=1, **KW)
        assert out.shape == (1, 8, 8, 3) and np.isfinite(out).all(), method
        assert 0.0 <= out.min() and out.max() <= 1.0


def _op_count(lowered) -> int:
    return sum(1 for line in lowered.as_text().splitlines() if " = " in line)


def test_one_program_whatever_num_steps(pipe, monkeypatch):
    """The lowered program has the same number of operations at 2 and 40 steps (the loop is
    a lax.scan), and a call compiles exactly one program."""
    seen = []
    jitted = jax.jit(programs.generate, static_argnums=(0, 1))
    monkeypatch.setattr(
        programs, "generate_jit", lambda *a: seen.append(jitted.lower(*a)) or jitted(*a)
    )
    for n in (2, 40):
        pipe.text_to_image("a cat", method="dpmpp_2m", num_steps=n, **KW)
    assert len(seen) == 2
    assert _op_count(seen[0]) == _op_count(seen[1])


def test_sharded_batch_equals_single_device(pipe, tiny_folder):  # noqa: F811
    lat = np.random.RandomState(0).randn(4, 8, 8, 3).astype(np.float32)
    prompts = ["a cat", "a dog", "the cube", "a ball"]
    sharded = pipe.text_to_image(prompts, latents=lat, num_steps=2, output="latent", **KW)
    assert len(sharded.sharding.device_set) == 4  # gcd(4, 8 devices)
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")
    )
    single = pipelines.load(tiny_folder, mesh=mesh)
    alone = single.text_to_image(prompts, latents=lat, num_steps=2, output="latent", **KW)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(alone), rtol=1e-4, atol=1e-4)


def test_prompt_travel_ends_at_both_prompts(pipe):
    za, zb = (np.random.RandomState(i).randn(1, 8, 8, 3).astype(np.float32) for i in (1, 2))
    kw = dict(num_steps=2, max_sequence_length=8, guidance_scale=2.0, negative_prompt="red")
    frames = pipe.prompt_travel("a cat", "a blue dog", frames=3, batch_size=2, latents=za,
                                to_latents=zb, **kw)  # fmt: skip
    assert frames.shape == (3, 8, 8, 3)
    ends = pipe.text_to_image(["a cat", "a blue dog"], latents=np.concatenate([za, zb]), **kw)
    np.testing.assert_allclose(frames[[0, -1]], ends, atol=1e-4)
    assert np.abs(frames[1] - frames[0]).max() > 1e-2
    a, b = np.eye(2, dtype=np.float32)  # orthogonal unit vectors: slerp stays on the circle
    np.testing.assert_allclose(extras.slerp(a, b, [0.0, 0.5, 1.0]),
                               [[1, 0], [0.5**0.5, 0.5**0.5], [0, 1]], atol=1e-6)  # fmt: skip


def test_composable_diffusion():
    """Liu et al. 2022 eq. 11 against separate network calls, on a toy network."""
    net = lambda x, t, c: jnp.tanh(x * c["w"][:, None] + t)
    x = jnp.linspace(-1, 1, 6).reshape(2, 3)
    conds = {"w": jnp.array([[1.0, 2.0], [-1.0, 0.5]])}  # (K=2, B=2)
    uncond = {"w": jnp.array([0.3, 0.3])}
    weights = jnp.array([2.0, -0.5])
    got = programs.composable_model(net, conds, uncond, weights)(x, 0.1)
    u = net(x, 0.1, uncond)
    want = u + sum(w * (net(x, 0.1, {"w": c}) - u) for w, c in zip(weights, conds["w"]))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert extras.parse_composable("a red cube AND a ball :0.5 AND sky: -1") == [
        ("a red cube", 1.0), ("a ball", 0.5), ("sky", -1.0)
    ]  # fmt: skip


def test_composable_single_prompt_is_cfg(pipe):
    lat = np.random.RandomState(3).randn(1, 8, 8, 3).astype(np.float32)
    kw = dict(num_steps=2, max_sequence_length=8, guidance_scale=3.0, latents=lat)
    one = pipe.composable_text_to_image("a cat :1", **kw)
    cfg = pipe.text_to_image("a cat", **kw)
    np.testing.assert_allclose(one, cfg, atol=1e-5)
    two = pipe.composable_text_to_image("a cat :0.5 AND a cat :0.5", **kw)
    np.testing.assert_allclose(two, cfg, atol=1e-4)


def test_hires_fix(pipe):
    for mode in ("latent", "pixel"):
        out = pipe.hires_fix("a cat", scale=2.0, upscale=mode, strength=0.5, num_steps=2, **KW)
        assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()


def test_int8_denoiser(pipe):
    lat = np.random.RandomState(4).randn(1, 8, 8, 3).astype(np.float32)
    kw = dict(num_steps=2, latents=lat, output="latent", **KW)
    q = pipe.quantize_denoiser(min_size=0)
    full, small = pipe._graph("denoiser")[1], q._graph("denoiser")[1]
    assert quantize.nbytes(small) < 0.45 * quantize.nbytes(full)
    ref, got = pipe.text_to_image("a cat", **kw), q.text_to_image("a cat", **kw)
    err = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
    assert 0 < err < 0.05, err


# ----------------------------------------------------------------------------- bad input


def test_bad_folders(tmp_path, tiny_folder):  # noqa: F811
    with pytest.raises(pipelines.PipelineLoadError, match="no model_index.json"):
        pipelines.load(str(tmp_path))
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(pipelines.PipelineLoadError, match="supported: StableDiffusionPipeline"):
        pipelines.load(str(bad))
    (bad / "model_index.json").write_text(json.dumps(index))
    weights = bad / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: os.path.getsize(weights) // 2])  # truncated
    with pytest.raises(pipelines.PipelineLoadError, match="'text_encoder'.*model.safetensors"):
        pipelines.load(str(bad))


def test_bad_inputs(pipe):
    with pytest.raises(ValueError, match="height=7 must be a positive multiple of 2"):
        pipe.text_to_image("a cat", height=7, **KW)
    with pytest.raises(ValueError, match="unknown sampler 'nope'; valid"):
        pipe.text_to_image("a cat", method="nope", **KW)
    with pytest.raises(ValueError, match="latents has shape"):
        pipe.text_to_image("a cat", latents=np.zeros((1, 4, 4, 3)), **KW)
    image = np.full((1, 8, 8, 3), 0.5, np.float32)
    for strength in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            pipe.image_to_image("a cat", image, strength=strength, **KW)
    with pytest.raises(ValueError, match="values must lie in"):
        pipe.image_to_image("a cat", image - 0.9, **KW)
    with pytest.raises(ValueError, match="image must be"):
        pipe.image_to_image("a cat", image[..., :2], **KW)
    with pytest.raises(ValueError, match="height=7"):
        pipe.image_to_image("a cat", np.zeros((1, 7, 8, 3), np.float32), **KW)
    with pytest.raises(ValueError, match="mask must be"):
        pipe.inpaint("a cat", image, np.zeros((1, 4, 4)), **KW)
    with pytest.raises(ValueError, match="mask values must lie in"):
        pipe.inpaint("a cat", image, np.full((1, 8, 8), 2.0), **KW)


def test_long_prompt_is_truncated_with_a_warning(pipe):
    long = " ".join(["a red cat on the blue cube"] * 4)
    with pytest.warns(UserWarning, match="truncated"):
        cond, _ = pipe.encode_prompt(long, guided=False, max_sequence_length=8)
    assert cond["encoder_hidden_states"].shape[0] == 1


# ----------------------------------------------------------------------------- generate.py


def test_generate_cli(tiny_folder, tmp_path):  # noqa: F811
    from experiments import generate

    out = tmp_path / "out"
    record = generate.generate(pipeline=tiny_folder, prompt="a cat", out=str(out), num_images=2,
                               batch_size=1, steps=2, guidance=1.0, seed=3)  # fmt: skip
    assert sorted(os.listdir(out)) == ["image_000.png", "image_001.png", "settings.json"]
    saved = json.loads((out / "settings.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["settings"]["seed"] == 3 and saved["batch_seeds"] == [3, 4]
    assert saved["mode"] == "text_to_image" and saved["seconds_per_image"] > 0
    travel = generate.generate(pipeline=tiny_folder, prompt="a cat", travel_to="a dog",
                               frames=3, batch_size=3, steps=2, guidance=1.0,
                               out=str(tmp_path / "travel"))  # fmt: skip
    assert travel["files"][-1] == "travel.gif" and len(travel["files"]) == 4
    # bad input: nothing is written, no temporary folder is left behind
    for bad, error in ((dict(out=str(out)), r"FileExistsError: --out .* is not empty"),
                       (dict(strength=1.5, image=str(out / "image_000.png")), "ValueError"),
                       (dict(mask=str(out / "image_000.png")), "ValueError"),
                       (dict(height=7), "ValueError")):  # fmt: skip
        with pytest.raises((ValueError, FileExistsError)) as e:
            generate.generate(**{"pipeline": tiny_folder, "prompt": "a cat",
                                 "out": str(tmp_path / "bad"), "steps": 2, **bad})  # fmt: skip
        assert re.search(error, f"{e.type.__name__}: {e.value}"), e.value
    assert sorted(os.listdir(tmp_path)) == ["out", "travel"]
