"""LoRA against diffusers' `load_lora_weights` (PEFT backend) on one tiny SD pipeline folder:
a diffusers-format file written by diffusers' own `save_lora_weights` from PEFT adapters
(random A and B, alpha != rank), a kohya / A1111 file (lora_unet_ / lora_te_ keys, alpha
tensors, 1x1 and 3x3 conv entries, the CLIP `text_model.` prefix), both stacked with
`set_adapters` weights: the text encoder's states and the U-Net's prediction agree to <= 1e-4
relative. Merge / unmerge, unload and the bad input users hit."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _pipeline_fixtures import sd_folder  # noqa: F401
from flax import nnx

from diffusion import adapters, pipelines
from diffusion.adapters import files, lora

TOL = 1e-4
PROMPTS = ["a photo of a cat", "a red dog on the cube"]
RNG = np.random.RandomState(0)
LATENTS = RNG.randn(2, 8, 8, 4).astype(np.float32)
T = np.array([999.0, 321.0], np.float32)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1"]
TE_TARGETS = ["q_proj", "v_proj", "fc1"]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _peft_file(folder, path):
    """diffusers' save_lora_weights on PEFT adapters with random A and B (rank 4, alpha 8)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    torch.manual_seed(0)
    metadata = {}
    for name, targets in (("unet", UNET_TARGETS), ("text_encoder", TE_TARGETS)):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        inject_adapter_in_model(config, getattr(ref, name))  # transformers' add_adapter
        metadata[name] = config.to_dict()
    diffusers.StableDiffusionPipeline.save_lora_weights(
        path, unet_lora_layers=get_peft_model_state_dict(ref.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder),
        unet_lora_adapter_metadata=metadata["unet"],
        text_encoder_lora_adapter_metadata=metadata["text_encoder"],
    )  # fmt: skip
    return str(path / "pytorch_lora_weights.safetensors")


# kohya module names (diffusers U-Net / transformers CLIP with dots as underscores), whether a
# conv (3x3 or 1x1 kernel), and alpha. Attention and CLIP alphas are the file's most common
# value: diffusers drops theirs otherwise (see test_alpha_rule_differs_from_diffusers).
KOHYA = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", None, 2.0),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", None, 2.0),
    ("lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0", None, 2.0),
    ("lora_unet_mid_block_attentions_0_proj_in", 1, 5.0),
    ("lora_unet_down_blocks_0_resnets_0_conv1", 3, 1.0),
    ("lora_unet_up_blocks_0_resnets_1_conv_shortcut", 1, 3.0),
    ("lora_unet_up_blocks_0_resnets_0_time_emb_proj", None, 2.0),
    ("lora_te_text_model_encoder_layers_1_mlp_fc1", None, 2.0),
]


def kohya_file(path, ref, modules=KOHYA, rank=3, seed=1):
    """A kohya / A1111 LoRA for `ref` (a diffusers pipeline) with random weights."""
    from safetensors.numpy import save_file

    rs, tensors = np.random.RandomState(seed), {}
    for name, kernel, alpha in modules:
        component, _, rest = name.partition("_te_") if "_te_" in name else name.partition("_unet_")
        model = ref.text_encoder if "_te_" in name else ref.unet
        weight = dict(model.named_parameters())[_torch_name(model, rest) + ".weight"]
        out, inp = weight.shape[:2]
        k = (kernel, kernel) if kernel else ()
        tensors[f"{name}.lora_down.weight"] = rs.randn(rank, inp, *k).astype(np.float32) / 3
        tensors[f"{name}.lora_up.weight"] = rs.randn(out, rank, *(1,) * len(k)).astype(np.float32)
        tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    save_file(tensors, str(path))
    return str(path)


def _torch_name(model, underscored):
    names = {n.replace(".", "_"): n for n, _ in model.named_modules()}
    names |= {"text_model_" + k: v for k, v in list(names.items())}
    return names[underscored]


@pytest.fixture(scope="module")
def base(sd_folder):  # noqa: F811
    return sd_folder


def _ref(folder, *loads, weights=None):
    """A fresh diffusers pipeline with LoRA files loaded (adapter names a0, a1, ...)."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    for i, file in enumerate(loads):
        pipe.load_lora_weights(file, adapter_name=f"a{i}")
    if weights is not None:
        pipe.set_adapters([f"a{i}" for i in range(len(loads))], weights)
    return pipe


def _ref_outputs(pipe):
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        states = pipe.text_encoder(ids.input_ids)[0]
        x = torch.from_numpy(LATENTS.transpose(0, 3, 1, 2))
        eps = pipe.unet(x, torch.from_numpy(T), states).sample
    return states.numpy(), eps.numpy().transpose(0, 2, 3, 1)


@nnx.jit
def _unet(unet, x, t, states):
    return unet(x, t, states)


def _our_outputs(pipe):
    cond, _ = pipe.encode_prompt(PROMPTS, guided=False)
    states = cond["encoder_hidden_states"]
    return np.asarray(states), np.asarray(_unet(pipe.unet, jnp.asarray(LATENTS), T, states))


def _check(ours, ref, label):
    for name, a, b in zip(("text states", "U-Net eps"), ours, ref):
        err = _rel(a, b)
        print(f"{label} {name}: relative error {err:.1e}")
        assert err <= TOL, (label, name, err)


def test_diffusers_file_matches_diffusers(base, tmp_path):
    file = _peft_file(base, tmp_path)
    pipe = pipelines.load(base)
    assert pipe.load_lora_weights(file) == "default_0"
    ours = _our_outputs(pipe)
    _check(ours, _ref_outputs(_ref(base, file)), "diffusers file")
    # 7 U-Net target names x their layers, rank 4, alpha 8 from the file's metadata
    mods = lora.adapters(pipe.unet)["default_0"]
    assert {a.alpha for a in mods.values()} == {8.0} and {a.rank for a in mods.values()} == {4}
    pipe.set_adapters("default_0", 0.0)  # weight 0: the base model again (no recompile)
    plain = _ref_outputs(_ref(base))
    _check(_our_outputs(pipe), plain, "adapter weight 0 vs diffusers without LoRA")
    assert _rel(ours[1], plain[1]) > 100 * TOL  # the LoRA changed the prediction


def test_kohya_file_and_stacking_match_diffusers(base, tmp_path):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    kohya = kohya_file(tmp_path / "kohya.safetensors", ref)
    pipe = pipelines.load(base)
    pipe.load_lora_weights(kohya, adapter_name="a0")
    _check(_our_outputs(pipe), _ref_outputs(_ref(base, kohya)), "kohya file")
    conv = lora.adapters(pipe.unet)["a0"]["down_blocks.0.resnets.0.conv1"]
    assert conv.down.shape == (3, 3, 32, 3) and conv.alpha == 1.0  # 3x3 conv, alpha tensor
    # a second LoRA stacks; set_adapters weights both, as diffusers'
    peft = _peft_file(base, tmp_path / "peft")
    pipe.load_lora_weights(peft, adapter_name="a1")
    pipe.set_adapters(["a0", "a1"], [0.6, -1.3])
    _check(_our_outputs(pipe), _ref_outputs(_ref(base, kohya, peft, weights=[0.6, -1.3])),
           "kohya + diffusers, weighted")  # fmt: skip


def test_where_diffusers_differs(base, tmp_path):
    """Two kohya entries diffusers 0.42 mishandles, checked against numpy instead: a `to_q`
    alpha that is not the file's most common one (ours: its own alpha; diffusers: the most
    common), and CLIP self-attention entries (diffusers with transformers 5 reports them as
    unexpected keys and drops them). Ours = W x + alpha / r * up down x."""
    ref = diffusers.StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    q_name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te_name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    modules = [
        (q_name, None, 7.0),
        (te_name, None, 2.0),
        ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k", None, 2.0),
        ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v", None, 2.0),
        ("lora_te_text_model_encoder_layers_1_mlp_fc1", None, 2.0),
    ]
    file = kohya_file(tmp_path / "k.safetensors", ref, modules)
    tensors, _ = files.read(file)
    pipe = pipelines.load(base)
    layers = {q_name: (pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q,
                       7.0),
              te_name: (pipe.text_encoder.encoder.layers[0].self_attn.q_proj, 2.0)}  # fmt: skip
    x = jnp.asarray(RNG.randn(3, 32), jnp.float32)
    before = {k: np.asarray(layer(x)) for k, (layer, _) in layers.items()}
    pipe.load_lora_weights(file)
    for key, (layer, alpha) in layers.items():
        delta = tensors[key + ".lora_up.weight"] @ tensors[key + ".lora_down.weight"]  # (out, in)
        want = before[key] + alpha / 3 * np.asarray(x) @ delta.T
        np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=1e-5, atol=1e-5)
    ref.load_lora_weights(file)
    q = ref.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert q.scaling == {"default_0": 2.0 / 3}  # not 7 / 3
    assert not hasattr(ref.text_encoder.encoder.layers[0].self_attn.q_proj, "lora_A")


def test_merge_unmerge_unload(base):
    """Fusing adds scale * weight * alpha / rank * down @ up to each kernel (no call-time cost),
    unfusing restores the kernels; unload gives the plain layers back (checked on a Linear and
    a 3x3 Conv layer)."""
    pipe = pipelines.load(base)
    q = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q
    conv = pipe.unet.down_blocks[0].resnets[0].conv1
    x = {q: jnp.asarray(RNG.randn(2, 5, 32), jnp.float32),
         conv: jnp.asarray(RNG.randn(2, 8, 8, 32), jnp.float32)}  # fmt: skip
    plain = {m: np.asarray(m(v)) for m, v in x.items()}
    kernel = {m: np.asarray(m.kernel[...]) for m in x}
    adapters.inject(pipe.unet, UNET_TARGETS, rank=2, alpha=4, rngs=nnx.Rngs(0))
    for a in lora.adapters(pipe.unet)["default"].values():
        a.up.set_value(jax.random.normal(jax.random.key(1), a.up.shape) * 0.3)
    pipe.set_adapters("default", 0.5)
    half = {m: np.asarray(m(v)) for m, v in x.items()}
    pipe.set_adapters("default", 1.0)
    pipe.fuse_lora(lora_scale=0.5)
    for m, v in x.items():
        a = m.lora["default"]
        delta = np.einsum("...ir,ro->...io", np.asarray(a.down[...]), np.asarray(a.up[...]))
        np.testing.assert_allclose(np.asarray(m.kernel[...]), kernel[m] + 0.5 * 2 * delta,
                                   atol=1e-6)  # fmt: skip
        np.testing.assert_allclose(np.asarray(m(v)), half[m], atol=1e-5)
        assert np.abs(half[m] - plain[m]).max() > 0.05
    pipe.unfuse_lora()
    for m in x:
        np.testing.assert_allclose(np.asarray(m.kernel[...]), kernel[m], atol=1e-6)
    pipe.unload_lora_weights()
    assert type(q) is nnx.Linear and type(conv) is nnx.Conv and not lora.adapters(pipe.unet)
    for m, v in x.items():
        np.testing.assert_allclose(np.asarray(m(v)), plain[m], atol=1e-5)


def test_bad_input(base, tmp_path):
    from safetensors.numpy import save_file

    pipe = pipelines.load(base)
    with pytest.raises(ValueError, match=r"\['to_qq'\].*candidate names: .*'to_out.0'"):
        adapters.inject(pipe.unet, ["to_qq"], rank=2, rngs=nnx.Rngs(0))
    # another architecture: modules this U-Net lacks, named by tensor
    bad = {
        "unet.down_blocks.3.attentions.0.proj_in.lora_A.weight": np.zeros((2, 32, 1, 1)),
        "unet.down_blocks.3.attentions.0.proj_in.lora_B.weight": np.zeros((32, 2, 1, 1)),
    }
    save_file({k: v.astype(np.float32) for k, v in bad.items()}, str(tmp_path / "a.safetensors"))
    with pytest.raises(files.LoRAFileError, match=r"down_blocks\.3\.attentions\.0\.proj_in"):
        pipe.load_lora_weights(str(tmp_path / "a.safetensors"))
    # rank mismatch between down and up, and a width mismatch: the tensors are named
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    mism = {
        f"{key}.lora_down.weight": np.zeros((4, 32)),
        f"{key}.lora_up.weight": np.zeros((32, 2)),
    }
    with pytest.raises(files.LoRAFileError, match=rf"rank mismatch: {key}\.lora_down\.weight"):
        pipe.load_lora_weights(mism)
    wide = {
        f"{key}.lora_down.weight": np.zeros((4, 64)),
        f"{key}.lora_up.weight": np.zeros((32, 4)),
    }
    with pytest.raises(files.LoRAFileError, match=rf"{key}\.lora_down\.weight has shape \(4, 64\)"):
        pipe.load_lora_weights(wide)
    assert not lora.adapters(pipe.unet)  # nothing was added by the failed loads
    with pytest.raises(files.LoRAFileError, match="text_encoder_2"):
        pipe.load_lora_weights({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                                np.zeros((2, 32)), "lora_te2_text_model_encoder_layers_0_mlp_fc1"
                                ".lora_up.weight": np.zeros((64, 2))})  # fmt: skip
    with pytest.raises(files.LoRAFileError, match="not a LoRA weight"):
        pipe.load_lora_weights({"unet.conv_in.weight": np.zeros((32, 4, 3, 3))})
    with pytest.raises(ValueError, match="unknown adapters"):
        pipe.set_adapters(["nope"])
