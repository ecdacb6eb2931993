"""Single files: detection, the key maps on full-size layouts (against diffusers' own
conversion functions, on meta tensors: nothing allocated), bad inputs, VAE swaps, diffusers
weight variants, built-in configs and `model_stats --checkpoint`."""

import json
import os
import pickle
import shutil
import warnings

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from _single_file_fixtures import sf_files, sf_folders  # noqa: F401
from diffusers.loaders import single_file_utils as sfu
from safetensors.numpy import load_file, save_file

from diffusion import models, pipelines
from diffusion.models import convert, ldm_keys
from diffusion.models.presets import class_name
from diffusion.pipelines import single_file_config
from diffusion.pipelines import single_file_layout as layout


def _ours(module):
    return {
        k.removeprefix("text_model."): v for k, v in convert.to_torch_state_dict(module).items()
    }


def _torch(module):
    return {k.removeprefix("text_model."): v.float().numpy() for k, v in module.state_dict().items()
            if not k.endswith("position_ids")}  # fmt: skip


def _equal(got, want):
    assert sorted(got) == sorted(want), set(got) ^ set(want)
    bad = [k for k in want if not np.array_equal(np.asarray(got[k], np.float32), want[k])]
    assert not bad, bad[:5]


def _meta_module(config):
    name = class_name(config)
    with torch.device("meta"):
        if name.startswith("CLIP"):
            cfg = {k: v for k, v in config.items() if k != "architectures"}
            return getattr(transformers, name)(transformers.CLIPTextConfig(**cfg))
        return getattr(diffusers, name).from_config(config)


def _full_size_file(arch):
    """{original key: meta tensor} of the published model's single file, made with our key maps
    from the diffusers modules (built on the meta device) of the built-in configs."""
    ckpt, state = {}, {}
    for comp in layout.ARCHITECTURES[arch].components:
        module = _meta_module(comp.preset)
        sd = {k if k.startswith(("text_model.", "text_projection")) or comp.kind not in
              ("clip", "openclip") else "text_model." + k: v
              for k, v in module.state_dict().items() if not k.endswith("position_ids")}  # fmt: skip
        state[comp.name] = (module, {k: tuple(v.shape) for k, v in sd.items()})
        groups = {}
        for key, entry in ldm_keys.key_map(comp.kind, sd).items():
            groups.setdefault(entry.key, []).append((entry, sd[key].shape))
        for key, parts in groups.items():
            shape = ldm_keys.original_shape([e for e, _ in parts], [s for _, s in parts])
            ckpt[comp.prefix + key] = torch.empty(shape, device="meta")
    if arch == "sd2":  # published files: OpenCLIP-H's 24th block and its text_projection
        p = "cond_stage_model.model."
        for k in [k for k in ckpt if k.startswith(p + "transformer.resblocks.22.")]:
            ckpt[k.replace(".22.", ".23.")] = ckpt[k]
        ckpt[p + "text_projection"] = torch.empty((1024, 1024), device="meta")
    return ckpt, state


# Keys of the published files (v1-5-pruned-emaonly, sd_xl_base_1.0) where the original layout
# and diffusers' lenient reader differ: Upsample after an attention layer is `.2.conv` (`.1.conv`
# without one), the encoder's Downsample `op`, the VAE's 1x1-conv attention, level order.
PUBLISHED = {
    "sd1": {"model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
            "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
            "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
            "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
            "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
            "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
            "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
            "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)},
    "sdxl": {"model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
             "model.diffusion_model.input_blocks.6.0.op.weight": (640, 640, 3, 3),
             "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
             "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight":
                 (1280, 2048),
             "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight":
                 (3840, 1280),
             "conditioner.embedders.1.model.text_projection": (1280, 1280)},
}  # fmt: skip


@pytest.mark.parametrize("arch,theirs", [("sd1", "v1"), ("sd2", "v2"), ("sdxl", "xl_base")])
def test_full_size_layouts_agree_with_diffusers(arch, theirs):
    """On the published models' structures (SD1.5, SD2.1, SDXL: 4 / 3 levels, 2 layers per
    block, SDXL's 10-deep transformers, 23 / 32-layer OpenCLIP towers): our detection and
    diffusers' infer_diffusers_model_type name the same model; diffusers' conversion functions
    send every tensor our key maps place back to its diffusers key, with its shape; keys of the
    published files are where our maps put them."""
    ckpt, state = _full_size_file(arch)
    shape_of = lambda k: tuple(ckpt[k].shape)  # noqa: E731
    for key, shape in PUBLISHED.get(arch, {}).items():
        assert key in ckpt and shape_of(key) == shape, key
    det = pipelines.detect(list(ckpt), shape_of)
    assert det.arch.name == arch and det.in_channels == 4 and not det.has_ema
    assert sfu.infer_diffusers_model_type(ckpt) == theirs
    a = layout.ARCHITECTURES[arch]
    convert_fns = {
        "unet": lambda c: sfu.convert_ldm_unet_checkpoint(ckpt, c.preset),
        "vae": lambda c: sfu.convert_ldm_vae_checkpoint(ckpt, c.preset),
        "clip": lambda c: {
            k: v
            for k, v in sfu.convert_ldm_clip_checkpoint(ckpt).items()
            if k.startswith("text_model.")
        },  # fmt: skip
        "openclip": lambda c: sfu.convert_open_clip_checkpoint(
            state[c.name][0], ckpt, prefix=c.prefix
        ),
    }
    for comp in a.components:
        got = {k: tuple(v.shape) for k, v in convert_fns[comp.kind](comp).items()}
        assert got == state[comp.name][1], comp.name
    # the built-in configs' preflight accepts the published shapes
    res = single_file_config.Resolved(a.pipeline, {c.name: c.preset for c in a.components},
                                      {}, a.scheduler, {}, builtin=True)  # fmt: skip
    single_file_config.preflight(shape_of, set(ckpt), det, res, arch)


def test_detection_cases(sf_files):  # noqa: F811
    for arch, path in sf_files.items():
        f = pipelines.single_file.open_checkpoint(path)
        det = pipelines.detect(list(f.keys()), lambda k, f=f: f.get_slice(k).get_shape(), path)
        assert det.arch.name == arch and det.pipeline == layout.ARCHITECTURES[arch].pipeline
    base = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "first_stage_model.encoder.conv_in.weight",
    ]
    shape9 = lambda k: (320, 9, 3, 3)  # noqa: E731
    det = pipelines.detect(base + ["cond_stage_model.transformer.text_model.x"], shape9)
    assert det.arch.name == "sd1" and det.pipeline == "StableDiffusionInpaintPipeline"
    det = pipelines.detect(base + ["conditioner.embedders.0.model.ln_final.weight"], shape9)
    assert det.arch.name == "sdxl-refiner" and not det.arch.loadable
    with pytest.raises(pipelines.LayoutError) as err:
        pipelines.detect(base + ["cond_stage_model.mystery.a.weight", "foo.bar.baz"], shape9, "x")
    msg = str(err.value)
    for needle in ("unrecognised", "sd1:", "sd2:", "sdxl:", "cond_stage_model.transformer.*",
                   "cond_stage_model.mystery.* (1 tensors)", "foo.bar.* (1 tensors)"):  # fmt: skip
        assert needle in msg, (needle, msg)
    with pytest.raises(pipelines.LayoutError, match="SD3"):
        pipelines.detect(["model.diffusion_model.joint_blocks.0.x"], shape9)
    with pytest.raises(pipelines.LayoutError, match="diffusers-layout U-Net"):
        pipelines.detect(["down_blocks.0.resnets.0.conv1.weight", "up_blocks.0.x"], shape9)


def test_bad_files_have_clear_errors(sf_files, sf_folders, tmp_path):  # noqa: F811
    path, folder = sf_files["sd1"], sf_folders["sd1"]
    data = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(pipelines.SingleFileError, match="truncated or corrupt"):
        pipelines.load_single_file(str(cut), config=folder)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(2)}}, ckpt)
    for bad in (ckpt, tmp_path / "disguised.safetensors"):
        if bad != ckpt:
            bad.write_bytes(ckpt.read_bytes())  # a zip pickle under a .safetensors name
        with pytest.raises(pipelines.SingleFileError, match="pickle.*executes code"):
            pipelines.load_single_file(str(bad), config=folder)
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(pipelines.SingleFileError, match="pickle"):
        pipelines.load_single_file(str(raw))
    tensors = load_file(path)
    z = np.zeros((4, 32), np.float32)
    loras = {"kohya": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": z,
                       "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": z.T,
                       "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.array(4.0)},
             "peft": {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": z,
                      "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": z.T}}  # fmt: skip
    for name, lora in loras.items():
        save_file(lora, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(pipelines.LayoutError, match="is a LoRA file"):
            pipelines.load_single_file(str(tmp_path / f"{name}.safetensors"), config=folder)
    vae = {k.removeprefix("first_stage_model."): v for k, v in tensors.items()
           if k.startswith("first_stage_model.")}  # fmt: skip
    save_file(vae, str(tmp_path / "vae.safetensors"))
    with pytest.raises(pipelines.LayoutError, match="VAE only.*vae="):
        pipelines.load_single_file(str(tmp_path / "vae.safetensors"), config=folder)
    with pytest.raises(pipelines.SingleFileError, match="is a StableDiffusionXLPipeline"):
        pipelines.load_single_file(path, config=sf_folders["sdxl"])
    with pytest.raises(pipelines.SingleFileError, match="architecture name.*sd1, sd2, sdxl"):
        pipelines.load_single_file(path, config="sd15")
    with pytest.raises(pipelines.SingleFileError, match="pass tokenizer="):
        pipelines.load_single_file(path)
    with pytest.raises(pipelines.SingleFileError, match="not the published sd1 model's shapes"):
        pipelines.load_single_file(path, tokenizer=os.path.join(folder, "tokenizer"))


def test_config_that_does_not_fit_names_the_tensors(sf_files, sf_folders, tmp_path):  # noqa: F811
    """A config folder without weights whose U-Net is wider / text encoder deeper than the
    file's: the error names each tensor (original and diffusers key) and both shapes."""
    folder = str(tmp_path / "config")
    shutil.copytree(sf_folders["sd1"], folder,
                    ignore=shutil.ignore_patterns("*.safetensors"))  # fmt: skip
    for name, edit in (("unet", {"block_out_channels": [16, 48]}),
                       ("text_encoder", {"num_hidden_layers": 3})):  # fmt: skip
        cfg = models.read_config(os.path.join(folder, name))
        cfg.update(edit)
        with open(os.path.join(folder, name, "config.json"), "w") as f:
            json.dump(cfg, f)
    with pytest.raises(pipelines.SingleFileError) as err:
        pipelines.load_single_file(sf_files["sd1"], config=folder)
    msg = str(err.value)
    assert "mis-shaped: model.diffusion_model.input_blocks.3.0.in_layers.2.weight " \
           "(down_blocks.1.resnets.0.conv1.weight): file (32, 16, 3, 3) vs config (48, 16, 3, 3)" \
           in msg, msg  # fmt: skip
    assert "[text_encoder] missing:    cond_stage_model.transformer.text_model.encoder.layers.2" \
           in msg, msg  # fmt: skip


def _vae_file(files, tmp_path, arch="sd2"):
    """The VAE of `arch`'s single file alone, unprefixed (the ft-MSE VAE files' naming)."""
    vae = {k.removeprefix("first_stage_model."): v for k, v in load_file(files[arch]).items()
           if k.startswith("first_stage_model.")}  # fmt: skip
    path = str(tmp_path / f"{arch}_vae.safetensors")
    save_file(vae, path)
    return path


def test_vae_swap(sf_files, sf_folders, tmp_path):  # noqa: F811
    """pipelines.load(folder, vae=file) with an original-layout VAE file (== diffusers'
    AutoencoderKL.from_single_file), load_single_file(file without VAE, vae=folder), and a
    diffusers-layout VAE file."""
    sd1, sd2 = sf_folders["sd1"], sf_folders["sd2"]
    path = _vae_file(sf_files, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.AutoencoderKL.from_single_file(path, config=sd1, subfolder="vae",
                                                       local_files_only=True)  # fmt: skip
    pipe = pipelines.load(sd1, vae=path)
    _equal(_ours(pipe.vae), _torch(ref))
    own = models.load_diffusers(os.path.join(sd1, "vae"))
    assert not np.array_equal(
        _ours(own)["decoder.conv_out.weight"], _torch(ref)["decoder.conv_out.weight"]
    )
    _equal(_ours(pipe.unet), _ours(models.load_diffusers(os.path.join(sd1, "unet"))))

    no_vae = {
        k: v for k, v in load_file(sf_files["sd1"]).items() if not k.startswith("first_stage")
    }
    save_file(no_vae, str(tmp_path / "no_vae.safetensors"))
    with pytest.raises(pipelines.SingleFileError, match="has no vae.*pass vae="):
        pipelines.load_single_file(str(tmp_path / "no_vae.safetensors"), config=sd1)
    pipe = pipelines.load_single_file(str(tmp_path / "no_vae.safetensors"), config=sd1,
                                      vae=os.path.join(sd2, "vae"))  # fmt: skip
    want = _ours(models.load_diffusers(os.path.join(sd2, "vae")))
    _equal(_ours(pipe.vae), want)
    diffusers_file = os.path.join(sd2, "vae", "diffusion_pytorch_model.safetensors")
    _equal(_ours(pipelines.load_vae(diffusers_file, pipe.configs["vae"])), want)
    with pytest.raises(pipelines.SingleFileError, match="needs the VAE config"):
        pipelines.load_vae(path)


def test_variants_and_dtypes(sf_folders, tmp_path):  # noqa: F811
    """diffusers' fp16 variant folder (pipelines.load(variant="fp16") == diffusers'
    from_pretrained(variant="fp16") in float32; bf16 params on request) and a bf16 variant of a
    sharded U-Net (load_diffusers(variant="bf16"))."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionPipeline.from_pretrained(sf_folders["sd1"])
        ref.to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
        ref16 = diffusers.StableDiffusionPipeline.from_pretrained(
            tmp_path / "fp16", variant="fp16", torch_dtype=torch.float32
        )
        unet_dir = tmp_path / "unet_bf16"
        ref.unet.to(torch.bfloat16).save_pretrained(unet_dir, variant="bf16", max_shard_size="40KB")
    assert any(f.endswith(".safetensors.index.bf16.json") for f in os.listdir(unet_dir))
    folder = str(tmp_path / "fp16")
    pipe = pipelines.load(folder, variant="fp16")
    pipe_bf16 = pipelines.load(folder, variant="fp16", param_dtype=jnp.bfloat16)
    for name in ("unet", "vae", "text_encoder"):
        want = _torch(getattr(ref16, name))
        _equal(_ours(getattr(pipe, name)), want)
        got = _ours(getattr(pipe_bf16, name))
        assert {str(v.dtype) for v in got.values()} == {"bfloat16"}
    with pytest.raises(pipelines.PipelineLoadError, match="variant="):
        pipelines.load(folder)
    unet = models.load_diffusers(str(unet_dir), variant="bf16")
    _equal(_ours(unet), _torch(ref.unet))  # the bf16 values, exactly, in float32


def test_builtin_configs_without_config(sf_files, sf_folders, monkeypatch):  # noqa: F811
    """No config: the architecture's built-in configs (here swapped for the tiny model's, as
    the published ones are too big for a test), the tokenizer folder with SD2's pad token and
    the built-in scheduler; a hint file `<checkpoint>.yaml` (A1111) says v or eps."""
    folder = sf_folders["sd2"]
    arch = layout.ARCHITECTURES["sd2"]
    tiny = tuple(
        type(c)(c.name, c.prefix, c.kind, models.read_config(os.path.join(folder, c.name)))
        for c in arch.components
    )
    monkeypatch.setitem(
        layout.ARCHITECTURES, "sd2", type(arch)(**{**arch.__dict__, "components": tiny})
    )
    tok = os.path.join(sf_folders["sd1"], "tokenizer")  # pad <|endoftext|>; SD2's is "!"
    with pytest.warns(UserWarning, match="using v_prediction"):
        pipe = pipelines.load_single_file(sf_files["sd2"], tokenizer=tok)
    assert pipe.tokenizer.pad_token == "!" and pipe.scheduler.class_name == "DDIMScheduler"
    assert pipe.scheduler.prediction_type == "v_prediction"
    _equal(_ours(pipe.unet), _ours(models.load_diffusers(os.path.join(folder, "unet"))))
    hint = os.path.splitext(sf_files["sd2"])[0] + ".yaml"
    with open(hint, "w") as f:
        f.write("model:\n  params:\n    parameterization: eps\n")
    try:
        res = single_file_config.resolve(sf_files["sd2"], pipe.detection, None, tok, None)
    finally:
        os.remove(hint)
    assert (
        res.scheduler["prediction_type"] == "epsilon" and res.configs["unet"]["sample_size"] == 64
    )


def test_model_stats_checkpoint(sf_files, sf_folders, tmp_path):  # noqa: F811
    from tools import model_stats

    stats = model_stats.main(["--checkpoint", sf_files["sdxl"], "--out", str(tmp_path / "s.json")])
    assert stats["arch"] == "sdxl" and stats["pipeline"] == "StableDiffusionXLPipeline"
    rows = {r["component"]: r for r in stats["rows"]}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        state = models.read_state_dict(os.path.join(sf_folders["sdxl"], name))
        want = sum(int(np.prod(v.shape)) for k, v in state.items() if "position_ids" not in k)
        assert rows[name]["params"] == want, name
        assert rows[name]["dtypes"].startswith("F32:")
    assert "ema" not in rows and rows["not weights / other"]["tensors"] == 5
    assert json.load(open(tmp_path / "s.json"))["arch"] == "sdxl"
