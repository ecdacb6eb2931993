"""Single-file (original LDM layout) checkpoints vs diffusers' `from_single_file`.

The files are written from tiny diffusers folders by our writer (`save_single_file`), with the
non-weight entries published files carry added. Two independent checks of the key maps:
diffusers' `from_single_file(file, config=folder)` must read back exactly the folder's tensors
(our writer puts every tensor where diffusers' reader looks), and our `load_single_file` must
hold exactly the tensors diffusers' `from_single_file` holds (our reader agrees with diffusers'
reader) - so a bug shared by our writer and reader would show in the first check.
"""

import json
import os
import warnings

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _single_file_fixtures import REFERENCE, sf_files, sf_folders  # noqa: F401
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from diffusion import models, pipelines
from diffusion.models import convert
from diffusion.pipelines import schedulers
from diffusion.pipelines import single_file_layout as layout

NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _torch_state(module):
    return {_norm(k): v.numpy() for k, v in module.state_dict().items()
            if not k.endswith("position_ids")}  # fmt: skip


def _norm(key):
    """transformers >= 5.6 drops CLIPTextModel's `text_model.` prefix; compare without it."""
    return key.removeprefix("text_model.")


def _ours_state(module):
    return {_norm(k): v for k, v in convert.to_torch_state_dict(module).items()}


def _assert_same(got, want, label):
    assert sorted(got) == sorted(want), (label, set(got) ^ set(want))
    bad = [k for k in want if got[k].shape != want[k].shape or not np.array_equal(got[k], want[k])]
    assert not bad, (label, bad[:5])


@pytest.fixture(scope="module")
def references(sf_folders, sf_files):  # noqa: F811
    """{arch: (from_pretrained(folder), from_single_file(file, config=folder))}."""
    out = {}
    for arch, folder in sf_folders.items():
        cls = REFERENCE[arch]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = cls.from_pretrained(folder)
            single = cls.from_single_file(sf_files[arch], config=folder, local_files_only=True)
        out[arch] = (ref, single)
    return out


@pytest.fixture(scope="module")
def ours(sf_folders, sf_files):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {a: pipelines.load_single_file(sf_files[a], config=sf_folders[a]) for a in sf_files}


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_diffusers_reads_our_file_exactly(references, arch):
    """Our writer: diffusers' from_single_file on our file == the folder, tensor for tensor."""
    ref, single = references[arch]
    for name in NETWORKS:
        if getattr(ref, name, None) is not None:
            want = _torch_state(getattr(ref, name))
            _assert_same(_torch_state(getattr(single, name)), want, f"{arch} {name}")


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_load_single_file_matches_diffusers(references, ours, arch):
    """Our reader: every component's tensors == diffusers' from_single_file's, exactly."""
    _, single = references[arch]
    pipe = ours[arch]
    assert pipe.detection.arch.name == arch
    assert isinstance(pipe, pipelines.FAMILIES["sdxl" if arch == "sdxl" else "sd"])
    for name in NETWORKS:
        if getattr(single, name, None) is not None:
            got = _ours_state(getattr(pipe, name))
            _assert_same(got, _torch_state(getattr(single, name)), f"{arch} {name}")
    want = "v_prediction" if arch == "sd2" else "epsilon"
    assert pipe.scheduler.prediction_type == want


def _folder_tensors(folder, name):
    state = models.read_state_dict(os.path.join(folder, name))
    return {_norm(k): np.asarray(v) for k, v in state.items() if not k.endswith("position_ids")}


def _assert_same_folders(new, old):
    for name in NETWORKS:
        if not os.path.isdir(os.path.join(old, name)):
            continue
        got, want = _folder_tensors(new, name), _folder_tensors(old, name)
        _assert_same(got, want, name)
        assert all(got[k].dtype == want[k].dtype for k in want), name
        assert models.read_config(os.path.join(new, name)) == models.read_config(
            os.path.join(old, name)
        )
    same = [schedulers.from_config(_read_json(f, "scheduler", "scheduler_config.json")).config
            for f in (new, old)]  # fmt: skip
    assert same[0] == same[1]


def _read_json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_round_trip_folder_file_folder_is_bit_identical(sf_folders, ours, arch, tmp_path):  # noqa: F811
    """folder -> save_single_file -> load_single_file -> save_pipeline_folder: the same tensors
    (values, dtypes) and component configs as the original folder."""
    new = pipelines.save_pipeline_folder(ours[arch], str(tmp_path / arch))
    _assert_same_folders(new, sf_folders[arch])


def test_convert_weights_tool_round_trip(sf_folders, tmp_path):  # noqa: F811
    """The command line, SD2 (v): folder -> single file -> folder, each step verified by the
    tool; the result equals the original folder and diffusers loads it."""
    from tools import convert_weights

    folder, file = sf_folders["sd2"], str(tmp_path / "sd2.safetensors")
    convert_weights.main(["--src", folder, "--dst", file, "--to", "single"])
    back = str(tmp_path / "back")
    convert_weights.main(["--src", file, "--dst", back, "--to", "pipeline", "--config", folder])
    _assert_same_folders(back, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = REFERENCE["sd2"].from_pretrained(back)
    assert ref.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(FileExistsError):  # never into a non-empty folder
        convert_weights.main(["--src", file, "--dst", back, "--to", "pipeline", "--config", folder])


def test_extract_ema_matches_diffusers(sf_folders, sf_files, tmp_path):  # noqa: F811
    """A file with a full EMA copy (LitEma's model_ema.<name without dots>): extract_ema=True
    loads the EMA U-Net, the same tensors diffusers' from_single_file(extract_ema=True) loads."""
    tensors = load_file(sf_files["sd1"])
    unet_keys = [k for k in tensors if k.startswith("model.diffusion_model.")]
    ema = {layout.ema_key(k): (0.01 - 0.5 * tensors[k]).astype(tensors[k].dtype) for k in unet_keys}
    path = str(tmp_path / "ema.safetensors")
    save_file({**tensors, **ema}, path)
    folder = sf_folders["sd1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.UNet2DConditionModel.from_single_file(
            path, config=folder, subfolder="unet", extract_ema=True, local_files_only=True
        )
    pipe = pipelines.load_single_file(path, config=folder, extract_ema=True)
    want = _torch_state(ref)
    _assert_same(_ours_state(pipe.unet), want, "EMA U-Net")
    plain = _folder_tensors(folder, "unet")
    assert not np.array_equal(plain["conv_in.weight"], want["conv_in.weight"])
    with pytest.raises(pipelines.SingleFileError, match="no EMA copy"):
        pipelines.load_single_file(sf_files["sd1"], config=folder, extract_ema=True)


def test_fp16_file_loads_into_the_requested_dtype(sf_folders, tmp_path):  # noqa: F811
    """save_single_file(dtype="float16"), then fp32 params (== diffusers' from_single_file with
    torch_dtype float32) and bf16 params (the fp16 values rounded to bf16)."""
    folder, path = sf_folders["sd1"], str(tmp_path / "fp16.safetensors")
    pipelines.save_single_file(folder, path)  # overwritten: a written file is replaced whole
    pipelines.save_single_file(folder, path, dtype="float16")
    with safe_open(path, "np") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}  # noqa: SIM118
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = REFERENCE["sd1"].from_single_file(
            path, config=folder, local_files_only=True, torch_dtype=torch.float32
        )
    ours32 = pipelines.load_single_file(path, config=folder)
    ours16 = pipelines.load_single_file(path, config=folder, param_dtype=jnp.bfloat16)
    for name in ("unet", "vae", "text_encoder"):
        want = _torch_state(getattr(ref, name))
        got = _ours_state(getattr(ours32, name))
        _assert_same(got, want, name)
        assert all(v.dtype == np.float32 for v in got.values())
        got16 = _ours_state(getattr(ours16, name))
        assert all(str(v.dtype) == "bfloat16" for v in got16.values())
        _assert_same(got16, {k: v.astype(got16[k].dtype) for k, v in want.items()}, name)
