"""Every reproduction at reduced size, one combined report (benchmarks/results/reproduce/).

    python -m experiments.reproduce --config configs/reproduce/quick.py --workdir /tmp/reproduce \\
        --config.export=benchmarks/results/reproduce

Runs configs/reproduce/{ddim, dpm_solver, edm_grids, cfg_guidance, min_snr, sd3_objectives,
latent_vs_pixel}.py into <workdir>/<claim>/, sharing one model cache (<workdir>/models: the eps,
rectified-flow and min-SNR digits models at 2000 steps, the five SD3 variants at 1000) and
writes <workdir>/report.md: a verdict table, then each claim's numbers next to the paper's, its
plot and its one-sentence verdict. `export` copies the reports, plots and JSON (not the models)
there. Budget: at most 60 minutes on an idle 2-core CPU (training about 25 minutes, sampling and
scoring the rest): an estimate, not yet measured; each claim's seconds are in the report.
Latent vs pixel needs the shapes runs' workdirs
(`--config.claims.latent_vs_pixel.workdirs.ldm_unet=...`, see its config) and is "not run"
without them. A rerun with the same workdir reuses trained models (retrains nothing) and the
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
    c.claims = {name: m.get_config("runlocal" if v.runlocal else None)
                for name, m in CLAIMS.items()}  # fmt: skip
    return c
