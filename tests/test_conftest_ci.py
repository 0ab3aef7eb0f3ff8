"""In CI, missing shared data fails the run (conftest.py calls this at import) instead of skipping."""

from __future__ import annotations

import pytest

from conftest import require_shared_data_in_ci


def test_ci_without_examples_or_golden_fails(tmp_path):
    present, missing = tmp_path, tmp_path / "missing"
    with pytest.raises(RuntimeError, match="CI run without official examples"):
        require_shared_data_in_ci({"CI": "1"}, golden=present, examples=missing)
    with pytest.raises(RuntimeError, match="CI run without golden data"):
        require_shared_data_in_ci({"CI": "true"}, golden=missing, examples=present)
    require_shared_data_in_ci({"CI": "1"}, golden=present, examples=present)
    require_shared_data_in_ci({}, golden=missing, examples=missing)     # a user's clone: tests skip
