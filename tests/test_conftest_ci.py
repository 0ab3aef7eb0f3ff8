"""In CI, missing shared data fails the run instead of skipping the tests that need it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_without_examples_fails_collection(tmp_path, golden):
    # golden present, examples not: collecting one light module must fail, naming what is missing
    env = {**os.environ, "CI": "1", "MULTITALK_SHARED": str(tmp_path), "MULTITALK_GOLDEN": str(golden)}
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          str(REPO / "tests" / "test_packaging.py")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "CI run without official examples" in run.stdout + run.stderr
