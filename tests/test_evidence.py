"""`bitnet158 evidence`: the energy model against a hand computation, RAPL present or missing,
and the whole pipeline (train, cost, energy, plots, report) on the internal smoke setting — every
number in report.md must be a value of results.json."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet158.cli import main
from bitnet158.config import ModelConfig
from bitnet158.evidence import energy
from bitnet158.evidence.energy import Rapl, matmul_energy_pj, measure_joules, model_energy

SRC = str(Path(__file__).resolve().parents[1] / "src")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The 7 nm table (B1 Table 2), written out again here so a changed constant fails the test.
FP16_ADD, FP16_MUL, INT8_ADD, FP32_MUL = 0.16, 0.34, 0.007, 1.31


def test_energy_of_one_small_matmul_by_hand():
    # x [2 tokens, K=4] times W [N=3, K=4]^T: 3·4 = 12 weights, each used once per token.
    # FP16: 12 multiplies + 12 adds per token -> 2 · 12 · (0.34 + 0.16) = 12.0 pJ
    # ternary: 12 int8 adds per token        -> 2 · 12 · 0.007        = 0.168 pJ
    # our rescale: one fp32 multiply per output per token -> 2 · 3 · 1.31 = 7.86 pJ
    e = matmul_energy_pj(n=3, k=4, tokens=2)
    assert e["macs"] == 24
    assert e["fp16_pj"] == pytest.approx(2 * 12 * (FP16_MUL + FP16_ADD)) == pytest.approx(12.0)
    assert e["ternary_pj"] == pytest.approx(2 * 12 * INT8_ADD) == pytest.approx(0.168)
    assert e["rescale_pj"] == pytest.approx(2 * 3 * FP32_MUL) == pytest.approx(7.86)
    # the paper's 71.4x is this table's ratio: 0.50 pJ / 0.007 pJ
    assert e["fp16_pj"] / e["ternary_pj"] == pytest.approx(71.43, abs=0.01)


def test_energy_of_a_model_sums_its_linear_layers():
    # hidden 8, 2 heads of 4 (1 kv head), ffn 16, one layer:
    # q 8x8 + k 4x8 + v 4x8 + o 8x8 + gate 16x8 + up 16x8 + down 8x16 = 64+32+32+64+128+128+128 = 576
    cfg = ModelConfig(vocab_size=300, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=16, max_seq_len=16)
    e = model_energy(cfg)
    assert e["macs"] == 576
    assert e["fp16_pj"] == pytest.approx(576 * 0.50)
    assert e["ternary_pj"] == pytest.approx(576 * 0.007)
    # outputs per token: 8 + 4 + 4 + 8 + 16 + 16 + 8 = 64 rescale multiplies
    assert e["rescale_pj"] == pytest.approx(64 * FP32_MUL)


def test_rapl_missing_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(energy, "RAPL_GLOB", str(tmp_path / "nothing" / "intel-rapl*"))
    rapl = energy.find_rapl()
    if not Path("/sys/class/powercap").exists():
        assert not rapl.available and "does not exist" in rapl.reason
    else:
        assert not rapl.available and rapl.reason


def test_rapl_counters_are_unwrapped(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("999000000\n")
    (zone / "max_energy_range_uj").write_text("1000000000\n")
    # the counter wraps during the call: 999 J -> 1000 J (= 0) -> 2 J: 3 J in all
    joules, _ = measure_joules(Rapl([zone]), lambda: (zone / "energy_uj").write_text("2000000\n"))
    assert joules == pytest.approx(3.0)


NUMBER = re.compile(r"(?<![A-Za-z0-9_.])\d[\d,]*(?:\.\d+)?(?![A-Za-z_\d])")


def numbers_in(text: str) -> list[str]:
    return [n.rstrip(",").replace(",", "") for n in NUMBER.findall(text)]


def json_leaves(obj, skip=("claims",)):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in skip:
                yield from json_leaves(v, skip)
    elif isinstance(obj, list):
        for v in obj:
            yield from json_leaves(v, skip)
    else:
        yield obj


def assert_report_numbers_in_results(report: str, results: dict) -> None:
    """Each number in the report equals a results.json number at the report's precision, or is a
    number written in one of its strings (a version, a source citation). The claims list is left
    out: it holds the same formatted text as the report."""
    leaves = list(json_leaves(results))
    values = [abs(float(v)) for v in leaves if isinstance(v, (int, float)) and not isinstance(v, bool)]
    in_strings = {n for v in leaves if isinstance(v, str) for n in numbers_in(v)}
    missing = []
    for token in numbers_in(report):
        digits = len(token.split(".")[1]) if "." in token else 0
        if token in in_strings or any(f"{v:.{digits}f}" == token for v in values):
            continue
        missing.append(token)
    assert not missing, f"numbers in report.md that are not in results.json: {sorted(set(missing))}"


def test_the_number_check_catches_an_invented_figure():
    with pytest.raises(AssertionError, match="3.14"):
        assert_report_numbers_in_results("ours 2.50× and 3.14 ms", {"a": 2.5, "b": "torch 2"})


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evidence") / "smoke"
    assert main(["evidence", "--smoke", "--out", str(out), "--quiet"]) == 0
    return out


def test_smoke_run_writes_report_results_and_plots(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    report = (smoke_run / "report.md").read_text()
    assert results["mode"] == "smoke" and "smoke setting" in report
    for name in ("loss_curves.png", "cost.png", "ppl_ratio.png", "energy.png"):
        assert (smoke_run / name).read_bytes()[:8] == PNG_MAGIC
        assert f"({name})" in report
    sizes = results["quality"]["sizes"]
    assert [list(s["models"]) for s in sizes] == [["b158", "b1", "fp"]] * 2
    for s in sizes:
        # the three twins saw the same number of tokens; the curves have one loss per step
        assert {len(m["train_loss"]) for m in s["models"].values()} == {results["quality"]["train"]["steps"]}
        assert s["ppl_ratio_b158_fp"] == pytest.approx(s["models"]["b158"]["perplexity"] / s["models"]["fp"]["perplexity"])
    row = results["cost"]["shapes"][0]
    assert row["layers"] == 2 and row["full_layers"] == 24 and "2 of 24 layers" in report
    assert row["memory_ratio"] == pytest.approx(row["fp16_gb"] / row["packed_gb"])
    assert row["linear_bits_per_weight"] == pytest.approx(2.0, abs=0.01)  # i2: 2 bits + one scale per tensor
    rapl = results["energy"]["rapl"]
    if not rapl["available"]:  # a missing capability is said, never filled in
        assert "not available" in report and rapl["reason"] in report
        assert "energy_j_per_token_packed" not in row


def test_every_number_in_the_report_is_in_results_json(smoke_run):
    assert_report_numbers_in_results((smoke_run / "report.md").read_text(),
                                     json.loads((smoke_run / "results.json").read_text()))


def test_a_missing_extension_or_rapl_is_reported_as_missing(smoke_run):
    from bitnet158.evidence.report import build_claims, build_report

    results = json.loads((smoke_run / "results.json").read_text())
    results["machine"].update(extension=False, extension_error="disabled by BITNET158_DISABLE_EXT",
                              kernel_path="torch")
    results["energy"]["rapl"] = {"available": False, "reason": "energy_uj is not readable", "zones": []}
    results["claims"] = build_claims(results)
    report = build_report(results)
    assert "compiled extension missing: disabled by BITNET158_DISABLE_EXT" in report
    assert "not available** — energy_uj is not readable" in report
    assert "not measured: energy_uj is not readable" in report


def test_evidence_refuses_to_overwrite_a_report(smoke_run, capsys):
    assert main(["evidence", "--smoke", "--out", str(smoke_run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]


def test_a_stopped_run_resumes_to_the_same_figures(smoke_run, tmp_path, capsys):
    """Training runs are checkpointed under out/quality: a run stopped before its report continues
    with --resume (reusing finished runs) and reaches the same perplexities as an uninterrupted one."""
    import shutil

    out = tmp_path / "stopped"
    shutil.copytree(smoke_run / "quality", out / "quality")
    shutil.rmtree(out / "quality" / "XS-fp")  # as if stopped before the last training run
    assert main(["evidence", "--smoke", "--out", str(out), "--quiet"]) == 2  # neither --resume nor --force
    assert "--resume" in capsys.readouterr().err
    assert main(["evidence", "--smoke", "--out", str(out), "--quiet", "--resume"]) == 0
    assert "continuing the run" in capsys.readouterr().out
    done, again = (json.loads((d / "results.json").read_text())["quality"]["sizes"] for d in (smoke_run, out))
    for a, b in zip(done, again):
        for mode in ("b158", "b1", "fp"):
            assert b["models"][mode]["perplexity"] == a["models"][mode]["perplexity"]
            assert b["models"][mode]["train_loss"] == a["models"][mode]["train_loss"]


def test_resume_refuses_runs_made_with_other_settings(smoke_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "other"
    shutil.copytree(smoke_run / "quality", out / "quality")
    stamp = out / "quality" / "fingerprint.json"
    stamp.write_text(stamp.read_text().replace('"smoke"', '"quick"'))
    assert main(["evidence", "--smoke", "--out", str(out), "--quiet", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0]


@pytest.mark.slow
def test_quick_evidence_from_the_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, "-m", "bitnet158.cli", "evidence", "--quick", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "claim" in proc.stdout and "paper" in proc.stdout
    for name in ("report.md", "results.json", "loss_curves.png", "cost.png"):
        assert (out / name).exists()
    results = json.loads((out / "results.json").read_text())
    assert [s["preset"] for s in results["cost"]["shapes"]] == ["700m"]
    assert results["cost"]["shapes"][0]["layers"] == 24  # the quick mode keeps the full depth
    assert_report_numbers_in_results((out / "report.md").read_text(), results)
