"""Sampler sweep on a trained model (experiments/sweep_samplers.py).

    python -m experiments.train --config configs/digits_unet_eps.py --workdir /tmp/digits_eps
    python -m experiments.sweep_samplers --config configs/sweep_samplers.py \\
        --config.checkpoint=/tmp/digits_eps --workdir /tmp/sweep_digits_eps

For every method x grid x NFE x guidance scale: FD in digits-classifier features (with its
bootstrap std), precision / recall, class accuracy (digits runs) or the shapes judge's adherence
and FD in judge features (shapes text runs and diffusers pipeline folders), RMS distance to the
reference solver from the same x_T, milliseconds per sample and compile seconds. Writes
report.md, sweep.json, metrics.jsonl and quality_vs_nfe.png. The default (300 samples, 8 methods
x 4 NFEs x 2 guidance scales + the reference) on the digits model of configs/digits_unet_eps.py
is estimated at about 10 minutes on an idle 2-core CPU (not yet measured).

Keys (leaf overrides, `--config.methods=ddim,dpmpp_2m --config.nfes='(10,20)'`):
  checkpoint        a training workdir (config.json + checkpoints/) or a pipeline folder
  train_config      'configs/x.py[:variants]' to use instead of the workdir's config.json
  step              checkpoint step, -1 = latest
  methods           'name[:option=value...]' comma-separated (benchmark_samplers' syntax)
  grids             grid names, 'default' = each method's own
  nfes, guidance_scales, num_per_class (digits), num_per_prompt / num_prompts (text), seed
  reference         'method[:options]@steps' for rms_to_reference ('' = none)
  classifier, judge the feature extractors' folders (committed under benchmarks/results/)
  image_size, dataset   pipeline folders only: generated size and the judge's dataset
  exact_std, exact_schedule   checkpoint='exact:digits' only: no network, the exact denoiser of
                    the digits train split (a mixture of N(image, exact_std^2 I)) under that
                    schedule (experiments/sweep_sources.ExactDigitsSource)
Variants: `runlocal` (two methods, small NFEs, 5 samples per class: for tests).
"""

import ml_collections

from configs import common

METHODS = (
    "ddim,dpmpp_2m,dpm_solver_multistep:order=3,dpm_solver_fast,dpmpp_2s,unipc:order=2,heun,"
    "euler_ancestral"
)


def get_config(arg=None):
    v = common.parse(arg, flags=("runlocal",))
    c = ml_collections.ConfigDict()
    c.checkpoint = ""
    c.train_config = ""
    c.step = -1
    c.methods = METHODS
    c.grids = ("default",)
    c.nfes = (10, 15, 20, 50)
    c.guidance_scales = (1.0, 2.0)
    c.num_per_class = 30
    c.num_per_prompt = 4
    c.num_prompts = 0  # text runs: the first n evaluation prompts (0: all 32)
    c.seed = 0
    # converged on the digits eps model (RK4@100 on its cosine table is 0.16 RMS off DDIM@1000;
    # configs/reproduce/dpm_solver.py)
    c.reference = "dpmpp_2m@200"
    c.bootstrap = 20  # FD std from resampling the generated set
    c.cache = True  # reuse samples a setting already drew in this process (reproductions)
    c.classifier = "benchmarks/results/digits_classifier"
    c.judge = "benchmarks/results/shapes_judge"
    c.data_dir = ""
    c.image_size = 32
    c.dataset = "shapes/32x32"
    c.exact_std = 0.05
    c.exact_schedule = "squaredcos_cap_v2"
    if v.runlocal:
        c.methods = "ddim,dpmpp_2m"
        c.nfes = (3, 6)
        c.num_per_class = 5
        c.num_per_prompt = 2
        c.reference = "dpmpp_2m@12"
        c.bootstrap = 5
    return c
