"""The benchmark's sections, one file each, run in the order registered here.

A section is a module ``sections/<name>.py`` with ``run(b: harness.Bench) -> None``: it measures,
writes its figures into ``b.report.section("<name>")`` (and top-level keys with
``b.report.set(...)``), raises ``harness.Skipped`` when it cannot run here, and may set
``TINY_CPU = False`` to be left out of the ``--tiny-cpu`` default. To add one: write the file and
add its name to ``SECTIONS`` below, where it should run.
"""

from __future__ import annotations

import importlib

SECTIONS = (
    "ceilings",
    "forward",
    "teacache",
    "fp8",
    "baseline",
    "compile",
    "compiled_extra",
    "attention8",
    "vae",
    "clip4",
)


def in_tiny_cpu_default(name: str) -> bool:
    return getattr(importlib.import_module(f"sections.{name}"), "TINY_CPU", True)
