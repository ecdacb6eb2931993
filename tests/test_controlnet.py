"""ControlNetModel against diffusers' (PyTorch, CPU, fp32) on two tiny configs (SD1-style with
cross-attention; SDXL-style with text_time embeddings, linear projections, two transformer
layers, BGR control order and guess mode), random weights everywhere (zero convolutions too):
down and mid residuals, and the controlled U-Net's prediction vs diffusers' ControlNet + U-Net
pair, to <= 1e-4 relative. from_unet copies the encoder and zeroes the residuals as diffusers'
does; save_diffusers writes a folder ControlNetModel.from_pretrained reads. A
StableDiffusionControlNetPipeline folder loads with pipelines.load and draws diffusers' images
(same latents, control image and scale, guidance 5). Bad input."""

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _pipeline_fixtures import SD_SCHEDULER, _randomize, sd_folder  # noqa: F401
from flax import nnx

from diffusion import models, pipelines
from diffusion.models.controlnet import ControlledUNet, ControlNetModel

TOL = 1e-4
BASE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=24)  # fmt: skip
CONFIGS = {
    "sd1": dict(BASE, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2),
    "sdxl": dict(BASE, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 use_linear_projection=True, transformer_layers_per_block=(1, 2),
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8, layers_per_block=2),
}  # fmt: skip
CONTROL = {"sd1": dict(conditioning_embedding_out_channels=(8, 16)),
           "sdxl": dict(conditioning_embedding_out_channels=(8, 8, 16),
                        controlnet_conditioning_channel_order="bgr")}  # fmt: skip


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _pair(name, tmp_path):
    """(diffusers U-Net, ControlNet) with random weights, and ours loaded from their folders."""
    torch.manual_seed(0)
    unet = _randomize(diffusers.UNet2DConditionModel(**CONFIGS[name]), 0, scale=0.5)
    cn = diffusers.ControlNetModel.from_unet(unet, **CONTROL[name])
    _randomize(cn, 1, scale=0.5)  # zero convolutions random too: every path is compared
    unet.save_pretrained(tmp_path / "unet")
    cn.save_pretrained(tmp_path / "controlnet")
    ours = models.load_diffusers(str(tmp_path / "controlnet"))
    return unet, cn, models.load_diffusers(str(tmp_path / "unet")), ours


def _inputs(name, factor):
    rs = np.random.RandomState(2)
    x = rs.randn(2, 8, 8, 4).astype(np.float32)
    image = rs.uniform(0, 1, (2, 8 * factor, 8 * factor, 3)).astype(np.float32)
    ctx = rs.randn(2, 5, 24).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    added = None
    if name == "sdxl":
        added = {"text_embeds": rs.randn(2, 16).astype(np.float32),
                 "time_ids": rs.uniform(0, 64, (2, 6)).astype(np.float32)}  # fmt: skip
    return x, t, ctx, image, added


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_controlnet_and_controlled_unet_match_diffusers(name, tmp_path):
    unet, cn, our_unet, ours = _pair(name, tmp_path)
    assert isinstance(ours, ControlNetModel)
    x, t, ctx, image, added = _inputs(name, ours.cond_factor)
    guess = name == "sdxl"
    kw = dict(conditioning_scale=0.7, guess_mode=guess)
    tx, tt, tc = (
        torch.from_numpy(x.transpose(0, 3, 1, 2)),
        torch.from_numpy(t),
        torch.from_numpy(ctx),
    )
    tadded = None if added is None else {k: torch.from_numpy(v) for k, v in added.items()}
    with torch.no_grad():
        down, mid = cn(tx, tt, tc, controlnet_cond=torch.from_numpy(image.transpose(0, 3, 1, 2)),
                       added_cond_kwargs=tadded, return_dict=False, **kw)  # fmt: skip
        want = unet(tx, tt, tc, added_cond_kwargs=tadded, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample  # fmt: skip
    jadded = None if added is None else {k: jnp.asarray(v) for k, v in added.items()}

    @nnx.jit
    def run(ours, our_unet):
        d, m = ours(x, t, ctx, controlnet_cond=image, added_cond_kwargs=jadded, **kw)
        pred = our_unet(x, t, ctx, added_cond_kwargs=jadded, down_block_additional_residuals=d,
                        mid_block_additional_residual=m)  # fmt: skip
        return d, m, pred

    got_down, got_mid, got = run(ours, our_unet)
    assert len(got_down) == len(down)
    errs = [_rel(g, _nhwc(w)) for g, w in zip(got_down, down)]
    errs += [_rel(got_mid, _nhwc(mid)), _rel(got, _nhwc(want))]
    print(f"{name}: down {max(errs[:-2]):.1e}, mid {errs[-2]:.1e}, controlled U-Net {errs[-1]:.1e}")
    assert max(errs) <= TOL, errs
    if name == "sd1":  # the wrapper the pipelines use gives the same prediction
        both = ControlledUNet(our_unet, ours)
        pred = nnx.jit(lambda m: m(x, t, ctx, controlnet_cond=image, conditioning_scale=0.7))(both)
        assert _rel(pred, _nhwc(want)) <= TOL


def test_from_unet_and_save(tmp_path):
    """from_unet copies the encoder and zeroes the residuals (as diffusers' from_unet); the
    saved folder loads in diffusers with the same outputs."""
    torch.manual_seed(0)
    unet = _randomize(diffusers.UNet2DConditionModel(**CONFIGS["sd1"]), 0, scale=0.5)
    unet.save_pretrained(tmp_path / "unet")
    ours = ControlNetModel.from_unet(models.load_diffusers(str(tmp_path / "unet")),
                                     **CONTROL["sd1"])  # fmt: skip
    ref = diffusers.ControlNetModel.from_unet(unet, **CONTROL["sd1"])
    x, t, ctx, image, _ = _inputs("sd1", 2)
    down, mid = ours(jnp.asarray(x), t, ctx, controlnet_cond=image)
    assert all(float(jnp.abs(d).max()) == 0.0 for d in (*down, mid))  # zero convolutions
    ours_state = models.convert.to_torch_state_dict(ours)
    for key, value in ref.state_dict().items():  # the copied encoder and the zero convs
        if not key.startswith("controlnet_cond_embedding.") or "conv_out" in key:
            np.testing.assert_allclose(ours_state[key], value.numpy(), atol=1e-6, err_msg=key)
    # random zero convs, then a round trip through a diffusers folder
    for z in (*ours.controlnet_down_blocks, ours.controlnet_mid_block):
        z.kernel.set_value(jnp.ones_like(z.kernel[...]) * 0.1)
    models.save_diffusers(ours, str(tmp_path / "cn"))
    back = diffusers.ControlNetModel.from_pretrained(tmp_path / "cn")
    with torch.no_grad():
        want = back(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                    torch.from_numpy(ctx), torch.from_numpy(image.transpose(0, 3, 1, 2)),
                    return_dict=False)  # fmt: skip
    got = ours(jnp.asarray(x), t, ctx, controlnet_cond=image)
    assert _rel(got[1], _nhwc(want[1])) <= TOL and _rel(got[0][-1], _nhwc(want[0][-1])) <= TOL


def test_bad_input():
    net = ControlNetModel(models.controlnet.ControlNetConfig(
        in_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=24, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        conditioning_embedding_out_channels=(8, 16)), rngs=nnx.Rngs(0))  # fmt: skip
    x, t, ctx, image, _ = _inputs("sd1", 2)
    with pytest.raises(
        ValueError, match=r"controlnet_cond has shape \(2, 8, 8, 3\).*\(2, 16, 16, 3\)"
    ):
        net(jnp.asarray(x), t, ctx, controlnet_cond=image[:, :8, :8])
    with pytest.raises(ValueError, match="channel_order"):
        models.controlnet.ControlNetConfig(controlnet_conditioning_channel_order="rgba")
    with pytest.raises(ValueError, match="UNetMidBlock2DCrossAttn"):
        models.controlnet.ControlNetConfig(mid_block_type="UNetMidBlock2D")


def test_pipeline_matches_diffusers(sd_folder, tmp_path):  # noqa: F811
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    torch.manual_seed(0)
    cn = _randomize(diffusers.ControlNetModel.from_unet(
        ref.unet, conditioning_embedding_out_channels=(8, 16)), 3, scale=0.5)  # fmt: skip
    scheduler = diffusers.DDIMScheduler(**SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False)
    ref = diffusers.StableDiffusionControlNetPipeline(**{**ref.components, "scheduler": scheduler},
                                                      controlnet=cn)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp_path / "cn_pipe")
    ours = pipelines.load(str(tmp_path / "cn_pipe"))
    assert isinstance(ours.controlnet, ControlNetModel)
    rs = np.random.RandomState(4)
    latents = rs.randn(2, 8, 8, 4).astype(np.float32)
    control = (rs.uniform(0, 1, (1, 16, 16, 3)) > 0.5).astype(np.float32)  # a mask, batch of 1
    prompts, kw = ["a photo of a cat", "a red dog"], dict(guidance_scale=5.0)
    want = ref(prompts, image=torch.from_numpy(control.transpose(0, 3, 1, 2)),
               controlnet_conditioning_scale=0.6, num_inference_steps=3, output_type="np",
               latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)), **kw).images  # fmt: skip
    got = ours.text_to_image(prompts, control_image=control, controlnet_conditioning_scale=0.6,
                             num_steps=3, latents=latents, **kw)  # fmt: skip
    diff = float(np.abs(got - want).max())
    print(f"ControlNet pipeline: max abs diff {diff:.1e}")
    assert got.shape == want.shape == (2, 16, 16, 3) and diff <= 2e-3
    with pytest.raises(ValueError, match=r"control_image has shape \(1, 8, 8, 3\)"):
        ours.text_to_image(prompts, control_image=control[:, :8, :8], height=16, width=16)
    with pytest.raises(ValueError, match="needs control_image"):
        ours.text_to_image(prompts, num_steps=2)
    with pytest.raises(ValueError, match="needs a ControlNet pipeline"):
        ours.with_controlnet(None).text_to_image(prompts, control_image=control, num_steps=2)
