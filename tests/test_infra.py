"""infra/: promtool validates config and rules, rule unit tests pass, dashboard and alerts use exported names.

promtool comes with Debian's prometheus package (CI's .ci/run installs it); a missing promtool
fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stylegen import prom
from stylegen.errors import UserError
from stylegen.metrics import series_names

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "infra" / "prometheus"
DASHBOARD = ROOT / "infra" / "grafana" / "stylegen-dashboard.json"
NAME = re.compile(r"\b(stylegen_[a-zA-Z0-9_]+)\b")


def _promtool(*args: str | Path) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool not on PATH: apt-get install prometheus (CI's .ci/run does)"
    return subprocess.run([binary, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=PROM_DIR)


@pytest.mark.prometheus
def test_promtool_check_config():
    r = _promtool("check", "config", PROM_DIR / "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 5 rules found" in r.stdout + r.stderr  # it also checked alerts.yml


@pytest.mark.prometheus
def test_promtool_check_rules():
    r = _promtool("check", "rules", PROM_DIR / "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.prometheus
def test_promtool_rule_unit_tests():
    tests = sorted((PROM_DIR / "tests").glob("*.yml"))
    assert tests
    r = _promtool("test", "rules", *tests)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@pytest.mark.prometheus
def test_rendered_config_is_valid(tmp_path):
    cfg = prom.render_config(prom.load_config(PROM_DIR / "prometheus.yml"), PROM_DIR, scrape_interval="1s",
                             local_targets=["127.0.0.1:1"], targets_files=[str(tmp_path / "t" / "*.json")],
                             ray_discovery_file=str(tmp_path / "ray.json"), sd_refresh_interval="1s")
    path = prom.write_config(cfg, tmp_path / "p.yml")
    r = _promtool("check", "config", path)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert cfg["rule_files"] == [str(PROM_DIR / "alerts.yml")]
    assert jobs["stylegen"]["static_configs"] == [{"targets": ["127.0.0.1:1"]}]
    assert jobs["stylegen"]["file_sd_configs"] == [{"files": [str(tmp_path / "t" / "*.json")], "refresh_interval": "1s"}]
    assert jobs["ray"]["file_sd_configs"][0]["files"] == [str(tmp_path / "ray.json")]
    assert cfg["global"]["scrape_interval"] == "1s"


def test_shipped_config_strips_ray_prefix_and_reads_ray_discovery_file():
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["stylegen"]["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    relabel = jobs["ray"]["metric_relabel_configs"][0]
    m = re.fullmatch(relabel["regex"], "ray_stylegen_train_samples_total")
    assert m and relabel["replacement"].replace("$1", m.group(1)) == "stylegen_train_samples_total"
    assert not re.fullmatch(relabel["regex"], "ray_tasks")  # Ray's own metrics keep their names


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_dashboard_parses_and_names_only_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert {v["name"] for v in dash["templating"]["list"]} >= {"run", "trial", "datasource"}
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("throughput", "p50", "p95", "data-wait", "loss", "validation", "checkpoint age"):
        assert needed in titles, needed
    exported = series_names()
    exprs = _dashboard_exprs()
    assert len(exprs) >= 12
    used = set()
    for e in exprs:
        names = set(NAME.findall(e))
        assert names, f"no stylegen metric in {e!r}"
        assert names <= exported, f"{e!r} names {names - exported}, not exported by stylegen.metrics"
        used |= names
    for e in exprs:  # per rank and per trial: queries filter on the template variables
        if "label_values" not in e:
            assert '$run' in e and '$trial' in e, e
    assert {"stylegen_train_samples_total", "stylegen_train_step_duration_seconds_bucket",
            "stylegen_data_wait_seconds_total", "stylegen_train_loss", "stylegen_val_score",
            "stylegen_checkpoint_last_success_timestamp_seconds"} <= used


def test_alert_rules_name_only_exported_metrics():
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"StylegenNoTrainingProgress", "StylegenLossNotFinite",
                                           "StylegenDataWaitHigh", "StylegenCheckpointTooOld",
                                           "StylegenWorkerRestarted"}
    exported = series_names()
    for r in rules:
        names = set(NAME.findall(r["expr"]))
        assert names and names <= exported, (r["alert"], names - exported)


def test_name_check_catches_a_typo():
    # the checker itself: a misspelt metric is reported
    assert not set(NAME.findall("rate(stylegen_train_sample_total[5m])")) <= series_names()


def test_prometheus_command_without_binary_says_how_to_install(monkeypatch, capsys):
    from stylegen.cli import main

    monkeypatch.setattr(prom.shutil, "which", lambda name: None)
    assert main(["prometheus", "--port", "9999"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stylegen prometheus: error: 'prometheus' not found on PATH")
    assert "apt-get install prometheus" in err and "\n" not in err


def test_prometheus_command_rejects_missing_config(tmp_path, monkeypatch, capsys):
    from stylegen.cli import main

    monkeypatch.setattr(prom.shutil, "which", lambda name: "/usr/bin/true")
    assert main(["prometheus", "--config-file", str(tmp_path / "nope.yml"), "--data-dir", str(tmp_path)]) == 2
    assert "--config-file" in capsys.readouterr().err


def test_prometheus_argv_is_a_list_on_loopback(tmp_path):
    argv = prom.prometheus_argv("/usr/bin/prometheus", tmp_path / "p.yml", tmp_path, port=9091)
    assert argv[0] == "/usr/bin/prometheus"
    assert "--web.listen-address=127.0.0.1:9091" in argv
    assert f"--config.file={tmp_path / 'p.yml'}" in argv


def test_find_binary_error_is_user_error(monkeypatch):
    monkeypatch.setattr(prom.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="promtool.*apt-get install prometheus"):
        prom.find_binary("promtool")
