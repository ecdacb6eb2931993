"""DreamBooth (Ruiz et al. 2023) on the shapes latent text-to-image model: a new subject, the
"sks square" (left half yellow, right half blue; diffusion/adapters/concepts.py), from 6
images, with or without the prior-preservation loss on 200 class images ("a square at ...")
the base model generates; LoRA (default) or full U-Net fine-tuning.

    python -m experiments.train --config configs/shapes_dreambooth.py:prior=true \\
        --config.finetune.base=/work/runs/shapes_ldm_unet --workdir /work/runs/shapes_db_prior
    python -m experiments.train --config configs/shapes_dreambooth.py:prior=false \\
        --config.finetune.base=/work/runs/shapes_ldm_unet --workdir /work/runs/shapes_db_noprior
    python -m experiments.eval_finetune --workdir /work/runs/shapes_db_prior
    python -m experiments.eval_finetune --workdir /work/runs/shapes_db_noprior
    (add ,method=full to both for full fine-tuning; ,mmdit for an SD3-style base such as
    configs/shapes_ldm_mmdit.py: adapters on its joint attention, Euler class images;
    --config.finetune.prior.prompts=real for ordinary shapes images as the prior instead of
    class images, which kept the margins better on the MMDiT base)

eval_finetune measures the share of samples of 16 "a sks square ..." prompts that show the
subject (concepts.is_subject), the judge's adherence on 16 ordinary "a <colour> square ..."
prompts and on the 32 standard prompts (prior preservation should keep these near the base's;
the difference between the two runs is its measured benefit), and how often plain "a square
..." prompts drift to the subject. Results: benchmarks/results/shapes_dreambooth/.
`:runlocal` trains 6 steps (4 class images when prior=true).
"""

import ml_collections

from configs import common
from configs.shapes_lora import common_settings, finetune, on_mmdit

PROMPTS = [
    "a sks square at the center on a black background",
    "a sks square at the top left on a gray background",
    "a sks square at the bottom right on a brown background",
    "a sks square at the left on a black background",
]


def get_config(arg=None):
    v = common.parse(arg, flags=("runlocal", "mmdit"), prior=True, method="lora")
    if v.method not in ("lora", "full"):
        raise ValueError(f"method={v.method!r}: use lora or full")
    c = ml_collections.ConfigDict()
    c.name = f"shapes_dreambooth_{v.method}_{'prior' if v.prior else 'noprior'}"
    c.task = "finetune"
    c.data = {"batch_size": 4, "data_dir": ml_collections.config_dict.placeholder(str)}
    c.finetune = finetune("subject", 6, v.method)
    c.finetune.prior.num_images = 200 if v.prior else 0
    c = common_settings(c, PROMPTS, 400, v.runlocal)
    # LoRA at 1e-4 learnt the subject's colours but not its shape in 400 steps (2 of 32 samples);
    # 5e-4 draws it in 13-15 of 32 (benchmarks/results/shapes_dreambooth/README.md).
    if v.method == "full":
        c.optim.lr = 2e-5
    elif not v.runlocal:
        c.optim.lr = 5e-4
    if v.runlocal:
        c.data.batch_size = 2
        c.finetune.lora.rank = 2
        c.finetune.prior.num_images = 4 if v.prior else 0
        c.finetune.prior.num_steps = 2
    return on_mmdit(c) if v.mmdit else c
