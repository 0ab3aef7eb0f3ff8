"""Shared test fixtures.

Golden data (``../shared/golden`` beside the repository, or ``$MULTITALK_GOLDEN``) and the official
examples (``../shared/examples``; ``$MULTITALK_SHARED`` moves both) are used whenever present; tests
that need them are skipped when they are absent (a user's clone), never in CI (``$CI`` set).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels (runtime/vae_fusion.py) are checked through Triton's interpreter. It
# must be chosen before anything imports triton (diffusers does), hence here, right after torch.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    env = os.environ.get("MULTITALK_SHARED")
    return Path(env) if env else REPO.parent / "shared"


SHARED = _shared_dir()
GOLDEN = Path(os.environ.get("MULTITALK_GOLDEN", SHARED / "golden"))
EXAMPLES = SHARED / "examples"



def require_shared_data_in_ci(environ=os.environ, golden: Path = GOLDEN, examples: Path = EXAMPLES) -> None:
    """CI must run every test: there, missing shared data is an error, not a skip."""
    if environ.get("CI"):
        for name, path in (("golden data", golden), ("official examples", examples)):
            if not path.is_dir():
                raise RuntimeError(f"CI run without {name} at {path}")


require_shared_data_in_ci()

torch.set_num_threads(min(2, os.cpu_count() or 1))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (the golden README's error measure)."""
    a = torch.as_tensor(a).detach().double()
    b = torch.as_tensor(b).detach().double()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="session")
def golden() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip("golden data (../shared/golden) not present")
    return GOLDEN


@pytest.fixture(scope="session")
def examples() -> Path:
    if not EXAMPLES.is_dir():
        pytest.skip("official examples (../shared/examples) not present")
    return EXAMPLES


@pytest.fixture(scope="session")
def golden_vectors(golden):
    from safetensors.torch import load_file

    cache: dict[str, dict[str, torch.Tensor]] = {}

    def get(name: str) -> dict[str, torch.Tensor]:
        if name not in cache:
            cache[name] = load_file(str(golden / "vectors" / f"{name}.safetensors"))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def golden_scalars(golden) -> dict:
    return json.loads((golden / "vectors" / "scalars.json").read_text())


@pytest.fixture(scope="session")
def tiny_ckpt_dir(golden) -> Path:
    return golden / "weights" / "Wan2.1-I2V-tiny"


@pytest.fixture(scope="session")
def tiny_wav2vec_dir(golden) -> Path:
    return golden / "weights" / "chinese-wav2vec2-tiny"


@pytest.fixture(scope="session")
def full_manifest(golden) -> dict:
    return json.loads((golden / "full_size_manifest.json").read_text())
