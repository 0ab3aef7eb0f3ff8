"""The package metadata: what ``pip install`` reads from ``pyproject.toml``."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_metadata_builds_without_deprecation_warnings():
    """``project.license`` is an SPDX string (a TOML table prints a setuptools deprecation on
    every install), and every package-data pattern names files that exist."""
    data = tomllib.loads(PYPROJECT.read_text())
    assert data["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in data["build-system"]["requires"]  # the first to take an SPDX string
    src = PYPROJECT.parent / "src"
    for package, patterns in data["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            assert list((src / package).glob(pattern)), f"package-data {package}/{pattern} matches nothing"
    setuptools = pytest.importorskip("setuptools")  # present wherever pip builds the package
    from setuptools.config import pyprojecttoml

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = setuptools.dist.Distribution()
        pyprojecttoml.apply_configuration(dist, str(PYPROJECT))
    assert dist.metadata.license_expression == "Apache-2.0"
