"""What a sampler sweep samples from and how it scores the samples (used by sweep_samplers.py).

Sources: a training run's workdir (EMA weights of a checkpoint; class-conditional, unconditional or
text-conditioned) or a diffusers pipeline folder (text-to-image). `source.generate(setting, scale)`
returns images in [-1, 1] with the NFE used and the compile and run seconds. Every setting starts
from the same x_T (the same seed), so deterministic samplers can be compared sample by sample
with a reference solution of the same ODE.

Scorers read the images with a feature extractor trained here, never Inception:
  digits (class-conditional or unconditional runs on the built-in digits): FD in
      digits-classifier features to the real train split (with a bootstrap std over the generated
      set), improved precision / recall against as many real train images, and the accuracy of
      the classifier on the labels the samples were conditioned on;
  shapes text runs and pipeline folders: the shapes judge's full-prompt adherence (per prompt
      group) and FD in judge features to the real test split (experiments/eval_text2img.score).
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion import metrics, tasks
from diffusion.metrics import digits_classifier, features, shapes_judge
from diffusion.train_state import restore_ema
from diffusion.workdir import read_config
from experiments import eval_text2img

KINDS = ("class", "none", "text")
# Compiled sampling programs and loaded scorers, reused by every sweep in the process (the
# reproductions sweep one model many times, and several models of the same architecture).
_PROGRAMS: dict = {}
_SCORERS: dict = {}


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def judge_prompts(dataset, data_dir, num_prompts=0):
    """eval_text2img's evaluation prompts [(prompt, group)], the first num_prompts (0: all)."""
    prompts = eval_text2img.eval_prompts(eval_text2img.train_captions(dataset, data_dir))
    return prompts[:num_prompts] if num_prompts else prompts


class WorkdirSource:
    """The EMA weights of a training run's checkpoint (default: the latest).

    cfg: the run's config (config.json unless given); class runs draw num_per_class samples of
    every class in one batch, unconditional runs 10 * num_per_class, text runs num_per_prompt per
    evaluation prompt (one compiled program, called per prompt)."""

    def __init__(self, workdir, cfg=None, step=None, *, num_per_class=30, num_per_prompt=4,
                 data_dir=None, num_prompts=0):  # fmt: skip
        self.cfg = cfg if cfg is not None else read_config(workdir)
        self.task = tasks.from_config(self.cfg)
        if not isinstance(self.task, tasks.DiffusionTask):
            raise ValueError(f"{workdir} is not a diffusion run (task={self.cfg.task!r})")
        self.kind = self.task.conditioning.name
        self.schedule = self.task.schedule
        self.dataset = self.cfg.data.name
        self.data_dir = data_dir or self.cfg.data.get("data_dir") or None
        self.workdir, self.requested_step = workdir, step
        self.num_per_class, self.num_per_prompt = num_per_class, num_per_prompt
        m = self.cfg.model.config
        self.shape = (m.sample_size, m.sample_size, m.in_channels)  # latents or pixels
        self.num_prompts = num_prompts
        self.model = self.step = None

    def load(self):
        """Restore the weights (checkpoint.check_compatible names a mismatched parameter)."""
        self.model, self.step = restore_ema(self.cfg, self.task, self.workdir, self.requested_step)
        self.params = nnx.state(self.model)
        if self.kind == "class":
            k = self.task.conditioning.num_classes
            self.labels = np.repeat(np.arange(k, dtype=np.int32), self.num_per_class)  # (N,)
        elif self.kind == "none":
            self.labels = None
        else:
            self.prompts = judge_prompts(self.dataset, self.data_dir, self.num_prompts)
        return self

    def generate(self, s, scale, seed: int):
        """(images (N, H, W, C) or (P, N, H, W, 3) in [-1, 1], NFE, compile s, run s)."""
        guidance = jnp.float32(scale) if scale != 1.0 else 1.0  # one program for every scale
        opts = dict(s.options, return_info=True)
        rng = jax.random.key(seed)
        if self.kind == "text":
            return self._generate_text(s, guidance, opts, rng)
        graphdef, n = nnx.graphdef(self.model), 10 * self.num_per_class
        cond = None if self.labels is None else {"class_labels": jnp.asarray(self.labels)}
        n = n if self.labels is None else len(self.labels)

        def fn(params, g, key):
            return self.task.sample(nnx.merge(graphdef, params), key, cond, (n, *self.shape),
                                    method=s.method, num_steps=s.num_steps, guidance_scale=g,
                                    grid=s.grid, **opts)  # fmt: skip

        t, labels = self.task, None if self.labels is None else self.labels.tobytes()
        key = (nnx.graphdef(self.model), t.schedule, t.objective.prediction_type, t.conditioning,
               t.sampling.clip_x0, labels, n, self.shape, s.program, scale != 1.0)  # fmt: skip
        t0 = time.perf_counter()
        if key not in _PROGRAMS:
            _PROGRAMS[key] = jax.jit(fn).lower(self.params, guidance, rng).compile()
        compiled, compile_s = _PROGRAMS[key], time.perf_counter() - t0
        (x, info), run_s = _timed(compiled, self.params, guidance, rng)
        x = np.clip(np.asarray(self.task.to_pixels(x)), -1.0, 1.0)
        return x, int(info["nfe"]), compile_s, run_s

    def _generate_text(self, s, guidance, opts, rng):
        text = [p for p, _ in self.prompts]
        ids = np.asarray(self.task.conditioning.tokenizer(text))  # (P, L)
        fn = eval_text2img.prompt_program(
            self.task, self.model, self.shape, self.num_per_prompt, method=s.method,
            num_steps=s.num_steps, guidance=guidance, grid=s.grid, **opts,
        )  # fmt: skip
        t0 = time.perf_counter()
        compiled = fn.lower(self.params, ids[0], rng).compile()
        compile_s, out, times = time.perf_counter() - t0, [], []
        for p in range(len(text)):
            (z, info), secs = _timed(compiled, self.params, ids[p], jax.random.fold_in(rng, p))
            out.append(np.clip(np.asarray(self.task.to_pixels(z)), -1.0, 1.0))
            times.append(secs)
        return np.stack(out), int(info["nfe"]), compile_s, sum(times)


class PipelineSource:
    """A diffusers pipeline folder (pipelines.load), text-to-image at image_size: the shapes
    judge's prompts, num_per_prompt images each, one generation per prompt. Its programs compile
    inside text_to_image: compile seconds = first prompt's time minus the median of the rest."""

    kind = "text"

    def __init__(self, path, *, num_per_prompt=4, image_size=32, dataset="shapes/32x32",
                 data_dir=None, num_prompts=0):  # fmt: skip
        from diffusion import pipelines

        self.pipe = pipelines.load(path)
        self.schedule = self.pipe.scheduler.schedule
        self.workdir, self.step, self.cfg = path, None, None
        self.dataset, self.data_dir = dataset, data_dir
        self.num_per_prompt, self.image_size = num_per_prompt, image_size
        self.num_prompts = num_prompts

    def load(self):
        self.prompts = judge_prompts(self.dataset, self.data_dir, self.num_prompts)
        return self

    def generate(self, s, scale, seed: int):
        from diffusion import samplers

        out, times = [], []
        for p, (prompt, _) in enumerate(self.prompts):
            t0 = time.perf_counter()
            img = self.pipe.text_to_image(
                prompt, num_steps=s.num_steps, guidance_scale=scale, method=s.method,
                grid=s.grid, rng=jax.random.fold_in(jax.random.key(seed), p),
                num_images_per_prompt=self.num_per_prompt, height=self.image_size,
                width=self.image_size, sampler_options=dict(s.options) or None,
            )  # fmt: skip
            times.append(time.perf_counter() - t0)
            out.append(2.0 * np.asarray(img) - 1.0)  # [0, 1] -> [-1, 1]
        run = statistics.median(times[1:]) if len(times) > 1 else times[0]
        nfe = samplers.nfe(s.method, s.num_steps, **dict(s.options))
        return np.stack(out), nfe, max(times[0] - run, 0.0), run * len(times)


class ExactDigitsSource:
    """The exact denoiser of the digits train split: a Gaussian mixture with one component
    N(image, std^2 I) per training image (diffusion/analytic.py), class-conditional through the
    components of the class, unconditional through all of them, guided as a network would be:
    x0_u + s (x0_c - x0_u) (Ho & Salimans 2022, eq. 6 in x0 form). No network: the sampler sweep
    on the exact score of digits data, the same scorer as a trained model's sweep."""

    kind, dataset, step, num_per_prompt, num_prompts = "class", "digits", None, None, None

    def __init__(self, *, num_per_class=30, std=0.05, schedule="squaredcos_cap_v2",
                 data_dir=None):  # fmt: skip
        from diffusion import schedules

        self.workdir, self.cfg = f"exact:digits:std={std:g}", {}
        self.schedule, self.std = schedules.get(schedule), std
        self.num_per_class, self.data_dir = num_per_class, data_dir

    def load(self):
        from diffusion import analytic

        x, y = digits_classifier.real_digits("digits", "train", self.data_dir)
        self.shape = x.shape[1:]  # (S, S, 1)

        def gmm(images):
            k = len(images)
            flat = images.reshape(k, -1)  # (K, D)
            var = np.full_like(flat, self.std**2)
            return analytic.GMM(np.full(k, 1.0 / k), flat, var, self.shape)

        self.classes = [gmm(x[y == c]) for c in range(10)]
        self.all = gmm(x)
        self.labels = np.repeat(np.arange(10, dtype=np.int32), self.num_per_class)  # (N,)
        return self

    def denoise(self, x_t, t, scale):
        """Exact x0_hat of a class-major batch x_t (10 * n, S, S, 1), guided at `scale`."""
        n = self.num_per_class
        cond = jnp.concatenate([g.denoise(x_t[c * n:(c + 1) * n], t, self.schedule)
                                for c, g in enumerate(self.classes)])  # fmt: skip
        if scale == 1.0:
            return cond
        uncond = self.all.denoise(x_t, t, self.schedule)
        return uncond + scale * (cond - uncond)

    def generate(self, s, scale, seed: int):
        """(images (N, S, S, 1) in [-1, 1], NFE, compile s, run s)."""
        from diffusion import samplers

        def fn(key):
            x_T = samplers.prior(self.schedule, jax.random.fold_in(key, 0),
                                 (len(self.labels), *self.shape))  # fmt: skip
            return samplers.sample(lambda x, t: self.denoise(x, t, scale), x_T, self.schedule,
                                   method=s.method, num_steps=s.num_steps, grid=s.grid,
                                   rng=jax.random.fold_in(key, 1), return_info=True,
                                   **dict(s.options))  # fmt: skip

        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(jax.random.key(seed)).compile()
        compile_s = time.perf_counter() - t0
        (x, info), run_s = _timed(compiled, jax.random.key(seed))
        return np.clip(np.asarray(x), -1.0, 1.0), int(info["nfe"]), compile_s, run_s


def source_for(path, cfg=None, step=None, **kw):
    """A WorkdirSource (path holds config.json or cfg is given), a PipelineSource (path holds
    model_index.json) or the ExactDigitsSource (path 'exact:digits')."""
    if path == "exact:digits":
        keep = ("num_per_class", "data_dir", "std", "schedule")
        return ExactDigitsSource(**{k: v for k, v in kw.items() if k in keep})
    if os.path.exists(os.path.join(path, "model_index.json")):
        keep = ("num_per_prompt", "image_size", "dataset", "data_dir", "num_prompts")
        return PipelineSource(path, **{k: v for k, v in kw.items() if k in keep})
    if cfg is None and not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{path} is neither a training workdir (config.json) nor a diffusers pipeline folder "
            "(model_index.json)"
        )
    for key in ("image_size", "dataset", "std", "schedule"):
        kw.pop(key, None)
    return WorkdirSource(path, cfg, step, **kw)


# ---------------------------------------------------------------------------- scorers


class DigitsScorer:
    """FD in digits-classifier features, precision / recall and class accuracy (see module)."""

    feature_space = "digits-classifier features"

    def __init__(self, path, dataset="digits", data_dir=None, bootstrap=20, seed=0):
        self.features_fn, self.logits_fn = digits_classifier.load(path)
        x_train, _ = digits_classifier.real_digits(dataset, "train", data_dir)
        self.x_test, self.y_test = digits_classifier.real_digits(dataset, "test", data_dir)
        self.image_shape = x_train.shape[1:]
        self.real = features.extract(self.features_fn, x_train)  # (N_train, F)
        self.real_stats = metrics.feature_stats(self.real)
        self.bootstrap, self.seed = bootstrap, seed

    def check(self, shape):
        if tuple(shape) != tuple(self.image_shape):
            raise ValueError(
                f"the digits classifier reads images of shape {self.image_shape}; the model "
                f"samples {tuple(shape)}"
            )

    def _scores(self, f, logits, labels) -> dict:
        fd = lambda x: metrics.frechet_distance_from_stats(*metrics.feature_stats(x),
                                                           *self.real_stats)  # fmt: skip
        rng = np.random.default_rng(self.seed)  # the same resamples for every setting
        boot = [fd(f[rng.integers(0, len(f), len(f))]) for _ in range(self.bootstrap)]
        n = min(len(f), len(self.real))
        real = self.real[np.random.default_rng(0).choice(len(self.real), n, replace=False)]
        out = {"fd": fd(f), "fd_std": float(np.std(boot)) if boot else None,
               **metrics.precision_recall(real, f)}  # fmt: skip
        if labels is not None:
            out["accuracy"] = float(np.mean(np.argmax(logits, -1) == labels))
        return out

    def score(self, images, labels) -> dict:
        f = features.extract(self.features_fn, images)
        logits = features.extract(self.logits_fn, images)
        return self._scores(f, logits, labels)

    def baseline(self, n) -> dict:
        """The same scores for real held-out digits (the test split, at most n of them)."""
        x, y = self.x_test[:n], self.y_test[:n]
        return {"source": f"real test split ({len(x)} images)", **self.score(x, y)}


class JudgeScorer:
    """The shapes judge's adherence and FD in judge features (eval_text2img.score)."""

    feature_space = "shapes-judge features"

    def __init__(self, path, dataset="shapes/32x32", data_dir=None):
        self.judge = shapes_judge.load(path)
        self.real = shapes_judge.real_images(dataset, "test", data_dir)[0]
        self.image_shape = self.real.shape[1:]
        self._baseline = None

    def check(self, shape):
        if tuple(shape[-3:-1]) != tuple(self.image_shape[:2]):
            raise ValueError(f"the shapes judge reads {self.image_shape} images, not {shape}")

    def score(self, images, prompts) -> dict:
        s = eval_text2img.score(self.judge, images, prompts, self.real)
        self._baseline = s["fd_in_judge_features_real_vs_real"]
        out = {"fd": s["fd_in_judge_features"], "adherence": s["adherence"]}
        return out | {f"adherence_{g}": v for g, v in s["adherence_by_group"].items()}

    def baseline(self, n) -> dict:
        return {"source": f"real test split vs itself ({n} images)", "fd": self._baseline}


def scorer_for(source, *, classifier, judge, bootstrap=20):
    """The scorer that reads the source's samples; an error names what is supported."""
    ds = source.dataset
    if ds.startswith("digits") and source.kind in ("class", "none"):
        key = (DigitsScorer, classifier, ds, source.data_dir, bootstrap)
        build = lambda: DigitsScorer(classifier, ds, source.data_dir, bootstrap)  # noqa: E731
    elif ds.startswith("shapes") and source.kind == "text":
        key = (JudgeScorer, judge, ds, source.data_dir)
        build = lambda: JudgeScorer(judge, ds, source.data_dir)  # noqa: E731
    else:
        key = build = None
    if build is not None:
        if key not in _SCORERS:
            _SCORERS[key] = build()
        return _SCORERS[key]
    raise ValueError(
        f"no scorer for a {source.kind!r}-conditioned run on {ds!r}: the sweep scores "
        "class-conditional or unconditional digits runs (digits classifier) and text runs on "
        "shapes (shapes judge)"
    )
