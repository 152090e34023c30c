"""`make test`'s pytest-xdist distribution keeps each test file on one worker.

A file's module fixtures (a trained reference run, a Serve app, a cluster) are then built once, and
the tests sharing the session's local Ray run one after another. `--dist loadgroup` stopped doing
this with pytest 9.2 (xdist 3.8 still writes the group into ``item._nodeid``, which pytest 9.2 no
longer reads: pytest-dev/pytest-xdist#1386), silently: every test went to whichever worker was
free, and module fixtures ran once per worker. This runs the Makefile's own options on a small tree.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

from tiny import ROOT

FIXTURE_FILE = '''
import os, time, pytest

@pytest.fixture(scope="module")
def built():
    with open(os.environ["SETUPS"], "a") as f:
        f.write(f"{os.environ.get('PYTEST_XDIST_WORKER')}\\n")
    return 1

@pytest.mark.parametrize("i", range(6))
def test_uses(built, i):
    time.sleep(0.05)
'''


def make_test_options() -> list[str]:
    """The xdist options of the Makefile's ``test`` recipe (``-n N --dist MODE``)."""
    recipe = re.search(r"^test: .*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    args = shlex.split(recipe)
    return [args[args.index("-n")], args[args.index("-n") + 1], "--dist", args[args.index("--dist") + 1]]


def test_make_test_runs_each_file_on_one_worker(tmp_path):
    opts = make_test_options()
    assert opts[:2] == ["-n", "2"]
    for name in ("a", "b"):
        (tmp_path / f"test_{name}.py").write_text(FIXTURE_FILE)
    setups = tmp_path / "setups"
    r = subprocess.run([sys.executable, "-m", "pytest", *opts, "-q", "-p", "no:cacheprovider", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "SETUPS": str(setups)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "12 passed" in r.stdout
    workers = setups.read_text().split()
    # one module fixture per file: two files, two set-ups (on one or both workers), never one per worker per file
    assert len(workers) == 2 and all(w.startswith("gw") for w in workers), workers
