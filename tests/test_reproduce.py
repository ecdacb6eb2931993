"""The reproductions' claim logic end to end at runlocal size (configs/reproduce/quick.py:runlocal:
every claim's runlocal config, one shared model cache), with training and sampling replaced by a
synthetic world whose numbers follow the papers' findings (every digits claim must hold) or their
opposite (every digits claim must fail); the verdict rules on numbers worked out by hand; and the
claim configs' contract (command, paper numbers, what "held" means). Real training and sampling
are exercised by tests/test_sweep_samplers.py and by the command in
benchmarks/results/reproduce/README.md."""

import functools
import importlib
import json
import os

import pytest

from configs import sweep_samplers as sweep_config
from configs.reproduce import base, quick
from configs.reproduce import ddim as ddim_claim
from diffusion import samplers, schedules
from experiments import reproduce, reproduce_sampling, reproduce_training, sweep_samplers

TITLES = {name: m.get_config("runlocal").title for name, m in quick.CLAIMS.items()}
DIGITS_CLAIMS = [n for n in quick.CLAIMS if n != "latent_vs_pixel"]
# SD3 variants from best to worst in the paper world (the trained model's name, base.digits_model)
SD3_ORDER = ["digits_flow", "digits_rf_mode", "digits_eps_linear", "digits_rf_uniform",
             "digits_v_cosine"]  # fmt: skip
TRAIN_STEPS = (2, 4)  # the runlocal models' checkpoints


def paper_world(model: str, s, guidance: float, step: int) -> dict:
    """Numbers a model following the papers would give: solver error shrinks with NFE (faster for
    high-order solvers, slower with DDIM's eta, smallest on the karras grid for Heun and for
    DPM-Solver++(2M) under guidance); guidance raises precision and accuracy, lowers recall, and
    FD is smallest at scale 2; rf/lognorm beats the other objectives; min-SNR converges 4x faster."""
    kw = dict(s.options)
    eta = 2.0 if s.method == "ddpm" else float(kw.get("eta", 0.0))
    err = (1 + 10 * eta) / s.nfe_target
    if s.method not in ("ddim", "ddpm"):
        err = 1.0 / s.nfe_target**2
    if s.method == "heun" and s.grid != "karras":
        err *= 2
    if guidance > 3 and s.label != "dpmpp_multistep[order=2]":
        err *= 3
    offset = SD3_ORDER.index(model) if model in SD3_ORDER else 0
    if step > 0:
        offset += (2.0 if model == "digits_eps_min_snr" else 8.0) / step
    return {"fd": 1 + offset + err + (guidance - 2) ** 2 / 10, "fd_std": 0.01,
            "precision": guidance / (guidance + 1), "recall": 1 / (guidance + 1),
            "accuracy": 0.9 - offset / 10 - 1 / (guidance + 5), "rms_to_reference": err / 10}  # fmt: skip


def reversed_world(*args) -> dict:
    """Every number of paper_world turned the other way."""
    q = paper_world(*args)
    return {"fd": 10 - q["fd"], "fd_std": 0.01, "precision": 1 - q["precision"],
            "recall": 1 - q["recall"], "accuracy": 1 - q["accuracy"],
            "rms_to_reference": 1 - q["rms_to_reference"]}  # fmt: skip


@functools.cache
def _plan(methods, grids, nfes):
    """sweep_samplers.plan, once per distinct request (the two worlds plan the same sweeps)."""
    c = sweep_config.get_config()
    c.methods, c.grids, c.nfes = methods, grids, nfes
    return sweep_samplers.plan(c, schedules.get("squaredcos_cap_v2"))


def fake_sweep(world, trained):
    """sweep_samplers.sweep's rows from `world` for the settings the real sweep would plan."""

    def sweep(c, workdir):
        model = os.path.basename(c.checkpoint).rsplit("-", 1)[0]
        assert c.checkpoint in trained, "sampled a model that was not trained"
        settings = _plan(c.methods, tuple(c.grids), tuple(c.nfes))
        rows = []
        for g in c.guidance_scales:
            for s in settings:
                q = world(model, s, g, c.step)
                if not c.reference:
                    q["rms_to_reference"] = None
                rows.append({"method": s.label, "guidance": g, "num_steps": s.num_steps,
                             "grid": s.grid or samplers.get(s.method).default_grid,
                             "nfe_target": s.nfe_target, "nfe": s.nfe_target, **q})  # fmt: skip
        return {"rows": rows, "num_samples": 10 * c.num_per_class, "baseline": {"fd": 0.5}}

    return sweep


@pytest.fixture(scope="module", params=["paper", "reversed"])
def quick_run(request, tmp_path_factory):
    """run_quick of quick.py:runlocal in a synthetic world; models "trained" by a stub that
    records each distinct training config."""
    world = {"paper": paper_world, "reversed": reversed_world}[request.param]
    wd, trained = tmp_path_factory.mktemp("reproduce"), []

    def fake_train(cfg, path):
        os.makedirs(path)
        trained.append(path)

    cfg = quick.get_config("runlocal")
    cfg.export = str(wd / "export")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(reproduce.train, "train", fake_train)
        m.setattr(reproduce.sweep_samplers, "sweep", fake_sweep(world, trained))
        m.setattr(reproduce.Context, "checkpoint_steps", lambda self, wd: list(TRAIN_STEPS))
        if request.param == "reversed":  # plots are checked in the paper world only (cost)
            for module in (reproduce_sampling, reproduce_training):
                m.setattr(module, "plot_quality", lambda *a, **k: None)
        out = reproduce.run(cfg, str(wd))
        again = reproduce.run_claim(quick.get_config("runlocal").claims.ddim, str(wd / "again"),
                                    str(wd / "models"))  # fmt: skip
        n_trained = len(trained)
        # the same claim config in its own workdir: the finished result, nothing recomputed
        reused = reproduce.run_claim(quick.get_config("runlocal").claims.ddim, str(wd / "ddim"))
        assert len(trained) == n_trained
    return request.param, wd, out, trained, (again, reused)


def test_every_claim_reports(quick_run):
    world, wd, out, _, _ = quick_run
    assert list(out["claims"]) == list(quick.CLAIMS)
    for name, r in out["claims"].items():
        text = (wd / name / "report.md").read_text()
        assert text.startswith(f"# {TITLES[name]}") and "**Paper.**" in text, name
        assert r["sentence"] in text and r["held"] in (True, False, None)
        for plot in r["plots"] if world == "paper" else ():
            assert (wd / name / plot).stat().st_size > 1000, (name, plot)
        assert json.loads((wd / name / "results.json").read_text())["held"] == r["held"]
    # no shapes runs given: latent vs pixel is "not run"
    assert out["claims"]["latent_vs_pixel"]["sentence"].startswith("Not run: no latent run")
    combined = (wd / "report.md").read_text()
    assert all(f"## {t}" in combined for t in TITLES.values())
    assert "FD in digits-classifier features" in combined and "of 30 samples" in combined
    assert "**runlocal**" in combined and "quick.py:runlocal`" in combined


def test_verdicts_follow_the_numbers(quick_run):
    """Every digits claim holds in the paper world and fails in the reversed one."""
    world, _, out, _, _ = quick_run
    held = {n: out["claims"][n]["held"] for n in DIGITS_CLAIMS}
    assert held == dict.fromkeys(DIGITS_CLAIMS, world == "paper")
    prefix = "Held here: " if world == "paper" else "Did not hold here: "
    assert all(out["claims"][n]["sentence"].startswith(prefix) for n in DIGITS_CLAIMS)


def test_models_are_trained_once_and_shared(quick_run):
    """Seven distinct digits models for six claims (eps is shared by five); a rerun of a claim
    with the same cache trains nothing and gives the same numbers."""
    _, wd, out, trained, (again, reused) = quick_run
    assert len(trained) == len(set(trained)) == 7, trained
    names = {os.path.basename(t).rsplit("-", 1)[0] for t in trained}
    assert names == {f"digits_{k}" for k in base.KINDS}
    assert [m["cached"] for m in again["models"]] == [True]
    assert again["data"]["rows"] == out["claims"]["ddim"]["data"]["rows"]
    # rerun in the claim's own workdir with an unchanged config: its results.json as it was
    assert reused == json.loads((wd / "ddim" / "results.json").read_text())
    assert reused["seconds"] == out["claims"]["ddim"]["seconds"]


def test_numbers_are_consistent(quick_run):
    world, _, out, _, _ = quick_run
    c = out["claims"]
    sd3 = c["sd3_objectives"]["data"]["avg_rank"]
    assert sum(sd3.values()) == pytest.approx(15.0)  # ranks 1 + ... + 5 per setting and metric
    best = min(sd3, key=sd3.get)
    assert best == ("rf/lognorm(0.00, 1.00)" if world == "paper" else "v/cos")
    assert {r["guidance"] for r in c["dpm_solver"]["data"]["guided"]} == {6.0}
    assert sorted({r["train_step"] for r in c["min_snr"]["data"]["rows"]}) == list(TRAIN_STEPS)
    # paper world: min-SNR FD at step 2 (1 + 1 + err) is below plain's at step 4 (1 + 2 + err)
    assert c["min_snr"]["data"]["speedup"] == (2.0 if world == "paper" else None)


def test_export_copies_reports_not_models(quick_run):
    world, wd = quick_run[:2]
    exported = {
        str(p.relative_to(wd / "export")) for p in (wd / "export").rglob("*") if p.is_file()
    }
    assert {"report.md", "results.json", "ddim/report.md"} <= exported
    assert ("ddim/ddim.png" in exported) == (world == "paper")  # reversed world draws no plots
    assert not any("checkpoints" in p or p.startswith("models") for p in exported)


def test_verdict_rules():
    rows = [
        {"model": m, "nfe_target": n, "guidance": 1.0, "fd": fd, "accuracy": acc}
        for m, n, fd, acc in [
            ("a", 5, 1.0, 0.9),
            ("b", 5, 2.0, 0.9),
            ("c", 5, 3.0, 0.5),
            ("a", 10, 3.0, 0.1),
            ("b", 10, 2.0, 0.2),
            ("c", 10, 1.0, 0.3),
        ]
    ]
    # setting 5: fd ranks a1 b2 c3, accuracy a1.5 b1.5 c3; setting 10: fd c1 b2 a3, acc c1 b2 a3
    assert reproduce_training.average_ranks(rows, ["a", "b", "c"]) == pytest.approx(
        {"a": (1 + 1.5 + 3 + 3) / 4, "b": (2 + 1.5 + 2 + 2) / 4, "c": (3 + 3 + 1 + 1) / 4}
    )
    plain = [(250, 10.0), (500, 6.0), (1000, 4.0)]
    # reaches FD 4 at 250 + 250 (8 - 4) / (8 - 3) = 450 steps: 1000 / 450
    assert reproduce_training.speedup(plain, [(250, 8.0), (500, 3.0)]) == pytest.approx(
        (1000 / 450, 450)
    )
    assert reproduce_training.speedup(plain, [(250, 3.0)]) == (4.0, 250)
    assert reproduce_training.speedup(plain, [(250, 9.0), (1000, 5.0)]) == (None, None)
    curves = {
        "ldm": [{"train_flops": 1e9, "adherence": 0.2}, {"train_flops": 1e11, "adherence": 0.8}],
        "pix": [{"train_flops": 1e9, "adherence": 0.1}, {"train_flops": 1e10, "adherence": 0.3}],
    }
    held, because = reproduce_training.compare(curves, ["ldm"], ["pix"])
    assert held and "1e+10" in because and "0.500" in because  # log-interpolated: 0.2 + 0.6 / 2
    assert reproduce_training.compare({"ldm": curves["ldm"]}, ["ldm"], ["pix"])[0] is None
    assert reproduce.verdict(None, "no runs") == "Not run: no runs."
    assert reproduce.verdict(False, "x", "small data").endswith("x; a likely reason: small data.")


@pytest.mark.parametrize("name", list(quick.CLAIMS))
def test_claim_configs_document_themselves(name):
    module = importlib.import_module(f"configs.reproduce.{name}")
    doc = module.__doc__
    assert f"python -m experiments.reproduce --config configs/reproduce/{name}.py" in doc
    assert "Paper" in doc and "Held means" in doc and ":runlocal" in doc
    cfg = module.get_config()
    assert cfg.claim == name and cfg.paper and cfg.held_means and not cfg.runlocal
    with pytest.raises(ValueError, match="unknown variants"):
        module.get_config("runlocall")


def test_latent_vs_pixel_reads_and_rewrites_curve_files(tmp_path):
    """A run without a workdir is read from its curve file; the verdict follows the files'
    numbers; each curve is written back to the claim workdir (so an export keeps it); a file
    that is not a curve is a clear error."""
    rows = {"ldm": [(100, 1e9, 0.2), (200, 1e11, 0.8)], "pix": [(100, 1e9, 0.1), (200, 1e10, 0.3)]}
    cfg = quick.get_config("runlocal").claims.latent_vs_pixel
    cfg.workdirs, cfg.latent, cfg.pixel = {"ldm": "", "pix": ""}, ("ldm",), ("pix",)
    cfg.curves = {}
    for name, points in rows.items():
        curve = {"run": name, "workdir": f"/runs/{name}", "num_per_prompt": 4, "date": "d",
                 "rows": [{"train_step": s, "train_flops": f, "adherence": a, "fd": 1.0,
                           "flops_per_image": 1e6} for s, f, a in points]}  # fmt: skip
        (tmp_path / f"{name}.json").write_text(json.dumps(curve))
        cfg.curves[name] = str(tmp_path / f"{name}.json")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(reproduce_training, "plot_quality", lambda *a, **k: None)
        m.setattr(reproduce_training, "text_curve", lambda *a: pytest.fail("measured a curve"))
        out = reproduce.run_claim(cfg, str(tmp_path / "claim"))
    assert out["held"] is True and "ldm adheres 0.500 against pix's 0.300" in out["because"]
    assert f"ldm: read from {cfg.curves.ldm} (measured d from /runs/ldm" in out["table"]
    for name in rows:
        written = json.loads((tmp_path / "claim" / f"{name}_curve.json").read_text())
        assert written == json.loads((tmp_path / f"{name}.json").read_text())
    reproduce.export(str(tmp_path), str(tmp_path / "export"), ["claim"])
    assert sorted(os.listdir(tmp_path / "export" / "claim")) == [
        "ldm_curve.json", "pix_curve.json", "report.md", "results.json"]  # fmt: skip
    (tmp_path / "bad.json").write_text(json.dumps({"rows": [{"train_step": 1}]}))
    with pytest.raises(ValueError, match="is not a compute curve"):
        reproduce_training.read_curve(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reproduce_training.read_curve(str(tmp_path / "missing.json"))


def test_ddim_without_the_ddpm_row(tmp_path):
    """quick.py's ddpm_steps = 0: the DDIM table and verdict without the many-step DDPM sweep."""
    cfg = quick.get_config("runlocal").claims.ddim
    cfg.ddpm_steps = 0
    trained, swept = [], []
    sweep = fake_sweep(paper_world, trained)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(
            reproduce.train, "train", lambda c, path: (os.makedirs(path), trained.append(path))
        )
        m.setattr(
            reproduce.sweep_samplers, "sweep", lambda c, w: swept.append(c.methods) or sweep(c, w)
        )
        m.setattr(reproduce_sampling, "plot_quality", lambda *a, **k: None)
        out = reproduce.run_claim(cfg, str(tmp_path))
    assert len(swept) == 1 and out["held"] is True and out["data"]["ddpm"] is None
    assert "No many-step DDPM row" in out["table"]
    full = quick.get_config()
    assert full.claims.ddim.ddpm_steps == 0 and ddim_claim.get_config().ddpm_steps == 1000
    assert {c.model.total_steps for c in (full.claims.ddim, full.claims.dpm_solver)} == {1000}
    assert full.claims.edm_grids.models.flow == full.claims.sd3_objectives.models.flow
