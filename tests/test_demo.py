"""The demo's own pieces: a failing phase stops it with that exit code; the closing summary prints
where the results are and the eval table beside the shipped model's row."""

import json

import pytest

from stylegen import demo


def test_a_failing_phase_stops_the_demo_with_its_exit_code(tmp_path, capsys):
    phases = demo.Phases(total=2)
    with pytest.raises(SystemExit) as e:
        phases.run("verify", ["shard", "verify", str(tmp_path / "missing")])
    assert e.value.code not in (0, None)
    assert "[1/2] verify" in capsys.readouterr().out


def test_summary_prints_paths_and_the_eval_table_with_the_shipped_and_gatys_rows(tmp_path):
    shipped = json.loads((demo.ROOT / demo.SHIPPED_EVAL).read_text())
    rows = {k: dict(v) for k, v in shipped["rows"].items() if k != "gatys"}  # the demo evals without Gatys
    rows["model"]["objective_n"] = 1.2345
    (tmp_path / "eval.json").write_text(json.dumps({"rows": rows}))
    text = demo.summary(tmp_path, str(tmp_path / "ray"), tmp_path / "best", tmp_path / "s.png",
                        tmp_path / "c.png", tmp_path / "st.png", 290.0)
    assert "=== results (4.8 min)" in text
    assert f"best checkpoint: {tmp_path / 'best'}" in text
    table = text.split("\n\n")[-1].strip().splitlines()
    assert table[0].split() == list(demo.SUMMARY_COLUMNS)
    by_label = {line[:line.index("  ")]: line.split()[-4:] for line in table[1:]}
    assert by_label["demo's best trial (minutes of training)"][2] == "1.234"
    assert by_label["shipped model (51 min of training)"][2] == f"{shipped['rows']['model']['objective_n']:.3f}"
    gatys = next(v for k, v in by_label.items() if k.startswith("gatys"))
    assert gatys[2] == f"{shipped['rows']['gatys']['objective_n']:.3f}"
    assert by_label["identity (output=content)"] == ["0.000", "1.000", "1.000", "-"]


def test_ray_is_shut_down_after_the_metrics_help_and_before_the_summary(tmp_path, monkeypatch, capsys):
    """A line Ray forwards late cannot follow the summary: the demo disconnects from Ray first."""
    import ray

    calls = []
    monkeypatch.setattr(demo.Phases, "run", lambda self, name, args: calls.append("phase"))
    monkeypatch.setattr(demo, "ensure_embedded", lambda: type("S", (), {"content_dir": tmp_path, "style_dir": tmp_path}))
    monkeypatch.setattr(demo, "example_images", lambda out: (tmp_path / "c.png", tmp_path / "s.png"))
    monkeypatch.setattr(demo, "print_metrics_help", lambda: calls.append("metrics"))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(demo, "summary", lambda *a: calls.append("summary") or "SUMMARY")
    assert demo.main(["--out", str(tmp_path / "out")]) == 0
    assert calls == ["phase"] * 7 + ["metrics", "ray.shutdown", "summary"]
    assert capsys.readouterr().out.rstrip().endswith("SUMMARY")
