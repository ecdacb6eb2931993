"""The sampler sweep on a tiny trained digits model: its samples are the task's own (same x_T and
sampler), its metrics equal the metrics module's on those samples, and every input it cannot run
is an error before any sampling."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sweep_samplers as sweep_config
from configs.reproduce import base
from diffusion import checkpoint, data, metrics, samplers, schedules, sharding, tasks
from diffusion.metrics import digits_classifier
from diffusion.train_state import make_optimizer, restore_ema, state_fns
from diffusion.workdir import Workdir
from experiments import sweep_samplers, sweep_sources

STEP = 3


def write_untrained_run(cfg, workdir: str, step: int) -> None:
    """A training workdir (config.json + one checkpoint) holding the freshly initialised train
    state, as if saved at `step`: what the sweep reads, without compiling a train step (about
    a minute on this machine). Its samples are an untrained network's: the tests check the
    plumbing and the metrics against an independent path, not sample quality."""
    task = tasks.from_config(cfg)
    Workdir(workdir, cfg)
    tx, _ = make_optimizer(cfg.optim, cfg.total_steps)
    _, init_fn = state_fns(task, tx, cfg.seed)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    with checkpoint.Checkpointer(f"{workdir}/checkpoints") as ckpt:
        ckpt.save(step, sharding.shard_init(init_fn, mesh))
        ckpt.wait_until_finished()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The reproductions' runlocal eps digits model (tiny U-Net), untrained, at step STEP."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("digits", data_dir)
    cfg = base.digits_model("eps", runlocal=True)
    cfg.data.data_dir = data_dir
    wd = str(tmp_path_factory.mktemp("digits_eps"))
    write_untrained_run(cfg, wd, STEP)
    return wd, cfg, data_dir


def _config(run, **keys):
    c = sweep_config.get_config("runlocal")
    c.checkpoint, c.data_dir = run[0], run[2]
    for k, v in keys.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def swept(run, tmp_path_factory):
    wd = tmp_path_factory.mktemp("sweep")
    cfg = _config(run, methods="ddim,dpmpp_2m", nfes=(3,), guidance_scales=(2.0,),
                  reference="dpmpp_2m@3", num_per_class=4, cache=False)  # fmt: skip
    return wd, sweep_samplers.sweep(cfg, str(wd))


def test_writes_report_json_plot(swept):
    wd, s = swept
    for name in ("report.md", "sweep.json", "metrics.jsonl", "quality_vs_nfe.png", "config.json"):
        assert (wd / name).stat().st_size > 0, name
    assert json.loads((wd / "sweep.json").read_text())["rows"] == json.loads(json.dumps(s["rows"]))
    assert "digits-classifier features (not FID)" in (wd / "report.md").read_text()
    assert len(s["rows"]) == 2 and s["num_samples"] == 40 and s["step"] == STEP
    for r in s["rows"]:
        assert r["nfe"] == samplers.nfe(r["method"], r["num_steps"]) == 3
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and 0 <= r["accuracy"] <= 1
        assert r["fd"] > 0 and r["fd_std"] > 0 and r["ms_per_sample"] > 0
    # the reference is dpmpp_2m@3 itself: its row is at distance 0, DDIM's is not
    by = {r["method"]: r for r in s["rows"]}
    assert by["dpmpp_2m"]["rms_to_reference"] == 0.0 < by["ddim"]["rms_to_reference"]


def test_samples_and_metrics_match_an_independent_path(run, swept):
    """The guided DDIM row again: task.sample (the evaluation path of eval_digits) from the same
    seed, the committed classifier, metrics.frechet_distance / precision_recall directly."""
    wd, cfg, data_dir = run
    row = next(r for r in swept[1]["rows"] if (r["method"], r["guidance"]) == ("ddim", 2.0))
    task = tasks.from_config(cfg)
    model, _ = restore_ema(cfg, task, wd)
    labels = jnp.repeat(jnp.arange(10, dtype=jnp.int32), 4)
    x = task.sample(model, jax.random.key(0), {"class_labels": labels}, (40, 8, 8, 1),
                    method="ddim", num_steps=3, guidance_scale=2.0)  # fmt: skip
    x = np.clip(np.asarray(x), -1, 1)
    features_fn, logits_fn = digits_classifier.load("benchmarks/results/digits_classifier")
    real, _ = digits_classifier.real_digits("digits", "train", data_dir)
    f_real, f = np.asarray(features_fn(real)), np.asarray(features_fn(x))
    np.testing.assert_allclose(row["fd"], metrics.frechet_distance(f, f_real), rtol=1e-4)
    acc = np.mean(np.argmax(np.asarray(logits_fn(x)), -1) == np.asarray(labels))
    assert row["accuracy"] == pytest.approx(acc)
    sub = f_real[np.random.default_rng(0).choice(len(f_real), 40, replace=False)]
    pr = metrics.precision_recall(sub, f)
    assert (row["precision"], row["recall"]) == pytest.approx((pr["precision"], pr["recall"]))


def test_bad_inputs_fail_before_sampling(run, monkeypatch):
    def no_sampling(*a, **k):
        raise AssertionError("sampled before rejecting the input")

    monkeypatch.setattr(sweep_sources.WorkdirSource, "generate", no_sampling)
    cases = [
        ({"methods": "ddim,not_a_sampler"}, "unknown sampler 'not_a_sampler'; valid"),
        ({"methods": "ddim:etaa=1"}, "does not take options"),
        ({"methods": "dpm_solver:order=4"}, r"order in \(1, 2, 3\)"),
        ({"methods": "dpm_solver:order=3", "nfes": (2, 6)}, "needs NFE >= 3; the sweep asks"),
        ({"grids": ("no_grid",)}, "unknown grid 'no_grid'"),
        ({"nfes": (0,)}, "nfes must be integers >= 1"),
        ({"reference": "ddpm@10"}, "deterministic"),
        ({"guidance_scales": (-1.0,)}, "guidance scales must be >= 0"),
        ({"train_config": "configs/digits_unet_eps.py:runlocal"}, "does not match this model"),
    ]
    for keys, match in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            sweep_samplers.sweep(_config(run, **keys))
    with pytest.raises(ValueError, match="unconditional model has no guidance"):
        sweep_samplers.check_guidance((1.0, 2.0), "none")
    with pytest.raises(FileNotFoundError, match="neither a training workdir"):
        sweep_samplers.sweep(_config(run, checkpoint=str(run[2])))


def test_plan_picks_steps_on_the_grid():
    sched = schedules.get("squaredcos_cap_v2")
    c = sweep_config.get_config()
    c.methods, c.nfes = "heun,dpm_solver:order=3,ddim", (9, 10)
    got = {(s.label, s.nfe_target): s.num_steps for s in sweep_samplers.plan(c, sched)}
    # heun: 2n - 1 NFE (5 steps for both 9 and 10: run once, under the first target);
    # singlestep order 3 on a grid ending at 0: 3n - 2
    assert got == {("heun", 9): 5, ("dpm_solver[order=3]", 9): 3,
                   ("dpm_solver[order=3]", 10): 4, ("ddim", 9): 9, ("ddim", 10): 10}  # fmt: skip


def test_exact_digits_denoiser_is_the_mixture_posterior_mean(run):
    """ExactDigitsSource's x0_hat against a float64 NumPy posterior mean over the training
    images (x_t | image ~ N(alpha image, (alpha^2 std^2 + sigma^2) I)), conditional on each
    row's class and guided at scale 2 with the unconditional mean over all images."""
    src = sweep_sources.source_for("exact:digits", num_per_class=2, data_dir=run[2], std=0.1,
                                   schedule="squaredcos_cap_v2").load()  # fmt: skip
    x, y = digits_classifier.real_digits("digits", "train", run[2])
    t, sched = 0.4, src.schedule
    alpha, sigma = float(sched.alpha(t)), float(sched.sigma(t))
    x_t = np.random.default_rng(0).normal(size=(20, 8, 8, 1))  # rows 2c, 2c + 1: class c

    def posterior_mean(xt, images):  # (B, D), (K, D) -> (B, D)
        d2 = ((xt[:, None] - alpha * images[None]) ** 2).sum(-1)  # (B, K)
        logw = -0.5 * d2 / (alpha**2 * 0.1**2 + sigma**2)
        w = np.exp(logw - logw.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        shrink = alpha * 0.1**2 / (alpha**2 * 0.1**2 + sigma**2)
        return w @ images + shrink * (xt - alpha * (w @ images))

    flat, xt = x.reshape(len(x), -1).astype(np.float64), x_t.reshape(20, -1)
    cond = np.concatenate([posterior_mean(xt[2 * c : 2 * c + 2], flat[y == c]) for c in range(10)])
    uncond = posterior_mean(xt, flat)
    for scale, want in ((1.0, cond), (2.0, uncond + 2 * (cond - uncond))):
        got = np.asarray(src.denoise(jnp.asarray(x_t, jnp.float32), t, scale)).reshape(20, -1)
        np.testing.assert_allclose(got, want, atol=2e-4)
