"""The reproductions end to end at runlocal size (configs/reproduce/quick.py:runlocal: every
claim's runlocal variant, one shared model cache), the verdict rules on numbers worked out by
hand, and the claim configs' contract (command, paper numbers, what "held" means)."""

import importlib
import json
import os

import pytest

from configs.reproduce import base, quick
from diffusion import data
from experiments import reproduce, reproduce_training

TITLES = {name: m.get_config("runlocal").title for name, m in quick.CLAIMS.items()}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("digits", data_dir)
    wd = tmp_path_factory.mktemp("reproduce")
    cfg = quick.get_config("runlocal")
    cfg.data_dir, cfg.export = data_dir, str(wd / "export")
    return wd, reproduce.run(cfg, str(wd)), data_dir


def test_every_claim_reports(quick_run):
    wd, out, _ = quick_run
    assert list(out["claims"]) == list(quick.CLAIMS)
    for name, r in out["claims"].items():
        text = (wd / name / "report.md").read_text()
        assert text.startswith(f"# {TITLES[name]}") and "**Paper.**" in text, name
        sentence = r["sentence"]
        assert sentence.startswith(("Held here: ", "Did not hold here: ", "Not run: ")), sentence
        assert sentence in text and r["held"] in (True, False, None)
        for plot in r["plots"]:
            assert (wd / name / plot).stat().st_size > 1000, (name, plot)
        assert json.loads((wd / name / "results.json").read_text())["held"] == r["held"]
    # no shapes runs given: latent vs pixel is "not run"; every digits claim ran
    assert out["claims"]["latent_vs_pixel"]["held"] is None
    assert all(r["held"] is not None for n, r in out["claims"].items() if n != "latent_vs_pixel")
    combined = (wd / "report.md").read_text()
    assert all(f"## {t}" in combined for t in TITLES.values())
    assert "FD in digits-classifier features" in combined


def test_models_are_trained_once_and_shared(quick_run, tmp_path):
    """Seven distinct digits models for six claims (eps is shared by five); a rerun of a claim
    with the same cache trains nothing."""
    wd, out, data_dir = quick_run
    trained = sorted(os.listdir(wd / "models"))
    assert len(trained) == 7, trained
    assert {t.rsplit("-", 1)[0] for t in trained} == {f"digits_{k}" for k in base.KINDS}
    cfg = quick.get_config("runlocal").claims.ddim
    cfg.data_dir = data_dir
    again = reproduce.run_claim(cfg, str(tmp_path), str(wd / "models"))
    assert [m["cached"] for m in again["models"]] == [True]
    first = out["claims"]["ddim"]["data"]["rows"]
    assert [r["fd"] for r in again["data"]["rows"]] == [r["fd"] for r in first]


def test_numbers_are_consistent(quick_run):
    _, out, _ = quick_run
    c = out["claims"]
    sd3 = c["sd3_objectives"]["data"]["avg_rank"]
    assert len(sd3) == 5 and sum(sd3.values()) == pytest.approx(15.0)  # ranks 1 + ... + 5
    assert {r["guidance"] for r in c["dpm_solver"]["data"]["guided"]} == {6.0}
    steps = sorted({r["train_step"] for r in c["min_snr"]["data"]["rows"]})
    assert steps == [2, 4]
    for r in c["cfg_guidance"]["data"]["rows"]:
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["fd"] > 0


def test_export_copies_reports_not_models(quick_run):
    wd = quick_run[0]
    exported = {
        str(p.relative_to(wd / "export")) for p in (wd / "export").rglob("*") if p.is_file()
    }
    assert {"report.md", "results.json", "ddim/report.md", "ddim/ddim.png"} <= exported
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
