"""FID Inception-v3 against pytorch-fid's InceptionV3 holding the same random weights.

pytorch-fid is a test dependency installed with `pip install --no-deps pytorch-fid` (its
torchvision dependency is a CUDA build that does not import beside the CPU torch here).
tests/_torchvision_stub.py registers a minimal `torchvision` exposing only what
pytorch_fid.inception touches (torchvision's Inception3 layer definitions); pytorch-fid's own
code builds the network (`fid_inception_v3`: FIDInceptionA/C/E_1/E_2, input resize and
normalisation, block structure). Its weight download is replaced by our random state dict.

Random weights with plausible BatchNorm statistics: running statistics are calibrated by one
training-mode forward of pytorch-fid's model (cumulative averages over 4 random images), then
perturbed randomly (variances x U[0.5, 2], means shifted, random affine parameters), so every
layer's activations are O(1) rather than vanishing or exploding through 94 convolutions. That
state dict (torchvision's Inception3 names, with num_batches_tracked, as the real file) is
written in torch's legacy format (as pt_inception-2015-12-05-6726825d.pth is) and zip format.
Two images per size keep the CPU cost down (the network runs at 299 x 299 either way).
"""

import _torchvision_stub
import numpy as np
import pytest
import torch

from diffusion.metrics import features, inception, torch_files
from diffusion.models.convert import StateDictError

pytest.importorskip("pytorch_fid")


def _calibrate(model, gen):
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None  # cumulative average
        m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 48, 48, generator=gen))
        for m in bns:
            m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.5, 2.0, generator=gen))
            shift = torch.randn(m.running_mean.shape, generator=gen)
            m.running_mean.add_(0.1 * m.running_var.sqrt() * shift)
            m.weight.uniform_(0.5, 1.5, generator=gen)
            m.bias.normal_(0.0, 0.1, generator=gen)
    model.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(pytorch-fid InceptionV3, {format: weights path}) with one random FID state dict."""
    _torchvision_stub.install()
    import pytorch_fid.inception as pfi

    torch.manual_seed(0)
    random_sd = _torchvision_stub.Inception3(num_classes=1008, aux_logits=False).state_dict()
    built = {}

    def capture():  # keep pytorch-fid's Inception3 to save it under its own names
        built["net"] = original()
        return built["net"]

    original = pfi.fid_inception_v3
    mp = pytest.MonkeyPatch()
    mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: random_sd)
    mp.setattr(pfi, "fid_inception_v3", capture)
    try:
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    finally:
        mp.undo()
    _calibrate(model, torch.Generator().manual_seed(1))
    state = built["net"].state_dict()
    assert any(k.endswith("num_batches_tracked") for k in state)
    d = tmp_path_factory.mktemp("inception")
    paths = {"legacy": str(d / "pt_inception-legacy.pth"), "zip": str(d / "pt_inception-zip.pth")}
    torch.save(state, paths["legacy"], _use_new_zipfile_serialization=False)
    torch.save(state, paths["zip"])
    return model, paths


def _ref_features(model, images):
    with torch.no_grad():
        out = model(torch.from_numpy(images).permute(0, 3, 1, 2))[0]  # (N, 2048, 1, 1)
    return out.reshape(len(images), -1).numpy()


@pytest.mark.parametrize("size", [32, 320])  # upsampling and (non-antialiased) downsampling
def test_features_match_pytorch_fid(reference, size):
    model, paths = reference
    images = np.random.default_rng(size).random((2, size, size, 3)).astype(np.float32)
    ref = _ref_features(model, images)
    features_fn = inception.load(paths["legacy"])
    ours = np.asarray(features_fn(images))
    assert ours.shape == (2, 2048) and ref.std() > 1.0  # activations neither vanished nor NaN
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= 1e-4, f"max relative error {rel:.2e}"
    with pytest.raises(ValueError, match="images must be \\(N >= 1, H, W, 3\\)"):
        features_fn(images[..., :1])


def test_formats_load_the_same_weights(reference, tmp_path):
    """Legacy and zip torch files read (without torch) equal to torch.load; the safetensors
    conversion (tools.convert_inception) loads to the same model."""
    from tools import convert_inception

    _, paths = reference
    want = torch.load(paths["legacy"], weights_only=True)
    for path in paths.values():
        got = torch_files.read_state_dict(path)
        assert list(got) == list(want)
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)
    st = str(tmp_path / "pt_inception.safetensors")
    convert_inception.main([paths["legacy"], st])
    a = inception.from_state_dict(torch_files.read_state_dict(paths["zip"]))
    b = inception.from_state_dict(torch_files.read_state_dict(st))
    np.testing.assert_array_equal(a.Mixed_7c.branch_pool.bn.var.get_value(),
                                  b.Mixed_7c.branch_pool.bn.var.get_value())  # fmt: skip
    np.testing.assert_array_equal(a.fc.kernel.get_value(), b.fc.kernel.get_value())


def test_bad_weights_files(reference, tmp_path):
    _, paths = reference
    unrelated = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    torch.save(unrelated.state_dict(), tmp_path / "unrelated.pth")
    with pytest.raises(
        StateDictError, match="not the FID Inception-v3.*unexpected \\[0.bias, 0.weight"
    ):
        inception.load(str(tmp_path / "unrelated.pth"))
    state = torch_files.read_state_dict(paths["zip"])
    state["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)
    del state["fc.bias"]
    with pytest.raises(StateDictError, match="1 missing tensors \\[fc.bias\\].*1 mis-shaped"
                       ".*Mixed_6b.branch7x7_2.conv.weight"):  # fmt: skip
        inception.from_state_dict(state)

    class Evil:
        def __reduce__(self):
            return (print, ("side effect",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="refusing to load global .*print"):
        torch_files.read_state_dict(str(tmp_path / "evil.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="cannot read as a torch state dict"):
        torch_files.read_state_dict(str(tmp_path / "junk.pth"))


def test_extract_in_batches():
    """features.extract pads the last batch and drops the padding (a cheap stand-in extractor)."""
    calls = []

    def fn(x):
        calls.append(x.shape)
        return x.reshape(len(x), -1).sum(1, keepdims=True)

    images = np.arange(7 * 4, dtype=np.float32).reshape(7, 2, 2, 1)
    out = features.extract(fn, images, batch_size=3)
    np.testing.assert_array_equal(out, images.reshape(7, -1).sum(1, keepdims=True))
    assert calls == [(3, 2, 2, 1)] * 3
