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


def test_summary_prints_paths_and_the_eval_table_with_the_shipped_row(tmp_path):
    shipped = json.loads((demo.ROOT / "docs" / "pretrained-eval-heldout.json").read_text())
    rows = {k: dict(v) for k, v in shipped["rows"].items()}
    rows["model"]["objective_n"] = 1.2345
    (tmp_path / "eval.json").write_text(json.dumps({"rows": rows}))
    text = demo.summary(tmp_path, str(tmp_path / "ray"), tmp_path / "best", tmp_path / "s.png",
                        tmp_path / "c.png", tmp_path / "st.png", 290.0)
    assert "=== results (4.8 min)" in text
    assert f"best checkpoint: {tmp_path / 'best'}" in text
    lines = {line.split("  ")[0].strip(): line for line in text.splitlines() if "  " in line}
    assert "1.234" in lines["demo's best trial"]
    shipped_obj = f"{shipped['rows']['model']['objective_n']:.4g}"
    assert shipped_obj in next(v for k, v in lines.items() if k.startswith("shipped model"))
