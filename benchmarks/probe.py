"""What the GPU probes share: a timestamped log, a JSON report rewritten as it grows, and parts run
in order, each one's error and time recorded in its own section so that one failure keeps the rest.

    P = Probe("probe_x")                     # writes <out-dir>/probe_x.json
    P.run(out_dir, {"micro": micro, "model": model}, "micro,model")
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


class Probe:
    def __init__(self, name: str):
        self.name = name
        self.data: dict = {}
        self.out_dir = Path(".")
        self.started = time.perf_counter()

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f}s] {msg}", flush=True)

    def section(self, name: str) -> dict:
        return self.data.setdefault(name, {})

    def save(self) -> None:
        (self.out_dir / f"{self.name}.json").write_text(json.dumps(self.data, indent=1, default=str))

    def run(self, out_dir: Path, parts: dict[str, Callable[[], None]], wanted: str,
            hide: tuple[str, ...] = ()) -> None:
        """Run the comma-listed ``wanted`` parts in that order; print the report without ``hide`` keys."""
        names = [n.strip() for n in wanted.split(",") if n.strip()]
        unknown = [n for n in names if n not in parts]
        if unknown:
            raise SystemExit(f"unknown parts {unknown}; known: {', '.join(parts)}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            self.log(f"== {name}")
            t0 = time.perf_counter()
            try:
                parts[name]()
            except Exception as exc:
                sec = self.section(name)
                sec["error"] = f"{type(exc).__name__}: {exc}"[:1500]
                sec["traceback"] = traceback.format_exc()[-3000:].replace(str(REPO), "<repo>")
                self.log(f"{name} failed: {type(exc).__name__}: {str(exc)[:300]}")
            self.section(name)["step_s"] = time.perf_counter() - t0
            self.save()
        self.data["total_s"] = time.perf_counter() - self.started
        self.save()
        print(json.dumps(_without(self.data, hide), indent=1, default=str)[-7000:])


def _without(value, hide: tuple[str, ...]):
    if isinstance(value, dict):
        return {k: _without(v, hide) for k, v in value.items() if k not in hide}
    return value
