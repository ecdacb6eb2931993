"""Every reproduction at reduced size, one combined report (benchmarks/results/reproduce/).

    python -m experiments.reproduce --config configs/reproduce/quick.py --workdir /tmp/reproduce \\
        --config.export=benchmarks/results/reproduce

Runs configs/reproduce/{ddim, dpm_solver, edm_grids, cfg_guidance, min_snr, sd3_objectives,
latent_vs_pixel}.py into <workdir>/<claim>/, sharing one model cache (<workdir>/models) and
writes <workdir>/report.md: a verdict table, then each claim's numbers next to the paper's, its
plot and its one-sentence verdict. `export` copies the reports, plots, JSON and compute curves
(not the models) there. Quick sizes, to fit the budget (each claim's own config keeps its full
size): every digits model trained for 1000 steps instead of 2000 (so the rectified-flow model is
shared with SD3's rf/lognorm(0, 1) variant: 7 models, about 3 minutes each), no 1000-step DDPM
row in the DDIM table, SD3's variants sampled at 5 / 10 / 25 NFE instead of 5 / 10 / 50.
Budget: at most 60 minutes on an idle 2-core CPU; the full sizes took 69 minutes there
(2026-12-02, benchmarks/results/reproduce/README.md); each claim's seconds are in the report.
Latent vs pixel reads the shapes runs' committed compute curves (see its config; an hour or more
of training each) unless given their workdirs
(`--config.claims.latent_vs_pixel.workdirs.ldm_unet=...`), which it then measures.
A rerun with the same workdir reuses trained models (retrains nothing) and the
results of claims whose config did not change (recomputes only the changed claims).
`:runlocal` runs every claim's runlocal variant (tests).
"""

import ml_collections

from configs import common
from configs.reproduce import (
    cfg_guidance,
    ddim,
    dpm_solver,
    edm_grids,
    latent_vs_pixel,
    min_snr,
    sd3_objectives,
)

# Quick sizes (the claims' own configs keep theirs): every digits model trained for 1000 steps, so
# the rectified-flow model of edm_grids / cfg_guidance is also SD3's rf/lognorm(0, 1) variant.
QUICK = {name: "steps=1000" for name in ("ddim", "dpm_solver", "edm_grids", "cfg_guidance",
                                         "min_snr", "sd3_objectives")}  # fmt: skip
CLAIMS = {
    "ddim": ddim,
    "dpm_solver": dpm_solver,
    "edm_grids": edm_grids,
    "cfg_guidance": cfg_guidance,
    "min_snr": min_snr,
    "sd3_objectives": sd3_objectives,
    "latent_vs_pixel": latent_vs_pixel,
}


def get_config(arg=None):
    v = common.parse(arg, flags=("runlocal",))
    c = ml_collections.ConfigDict()
    c.claim = "quick"
    c.title = "Reproductions of published claims at reduced size"
    c.models_dir = ""
    c.data_dir = ""
    c.export = ""
    c.order = tuple(CLAIMS)  # the report's order (ConfigDict sorts its keys)
    c.claims = {name: m.get_config("runlocal" if v.runlocal else QUICK.get(name))
                for name, m in CLAIMS.items()}  # fmt: skip
    if not v.runlocal:
        c.claims.ddim.ddpm_steps = 0  # no 1000-step DDPM row (6 minutes)
        c.claims.sd3_objectives.nfes = (5, 10, 25)
    return c
