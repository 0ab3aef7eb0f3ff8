"""MultiTalk on Modal: the same job API as ``multitalk serve``, on one H100 container.

One-time setup::

    modal secret create multitalk-s3 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
        AWS_DEFAULT_REGION=... [AWS_ENDPOINT_URL=https://<s3-compatible>] \\
        MULTITALK_OUTPUT_PREFIX=s3://my-bucket/multitalk
    modal secret create multitalk-api MULTITALK_API_TOKENS=tok1,tok2 MULTITALK_WEBHOOK_SECRET=...
    modal run deploy/modal_app.py          # downloads the weights into the volume (once)
    modal deploy deploy/modal_app.py       # serves the API (URL printed by Modal)

The container loads the models once (``@modal.enter``), then serves the FastAPI app and runs jobs
in its in-process worker. The SQLite job store lives on a Modal Volume (``multitalk-state``) so
the queue survives container restarts; ``max_containers=1`` because SQLite cannot be shared
between containers. Keep clients polling (or set ``min_containers=1``): an idle container may be
scaled down, and a job interrupted that way is re-run after the restart (lease expiry).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import modal

APP_NAME = "multitalk"
REPO = Path(__file__).resolve().parents[1]
REMOTE_REPO = "/opt/multitalk"
WEIGHTS_DIR = "/weights"
STATE_DIR = "/state"
GPU = "H100"
TORCH_VERSION = "2.13.0"

DOWNLOAD_TIMEOUT_S = 4 * 3600       # ~80 GB on a slow link
SERVICE_TIMEOUT_S = 60 * 60         # per HTTP request (uploads, video streaming)
STARTUP_TIMEOUT_S = 30 * 60         # @modal.enter: loading 14B weights from the volume
SCALEDOWN_WINDOW_S = 20 * 60

# only the files MultiTalk reads (no xlm-roberta tokenizer, examples, or training assets)
WEIGHT_REPOS: dict[str, tuple[str, list[str]]] = {
    "Wan2.1-I2V-14B-480P": ("Wan-AI/Wan2.1-I2V-14B-480P", [
        "config.json",
        "diffusion_pytorch_model-*-of-*.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
        "Wan2.1_VAE.pth",
        "google/umt5-xxl/*",
    ]),
    "MeiGen-MultiTalk": ("MeiGen-AI/MeiGen-MultiTalk", [
        "multitalk.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
    ]),
    "chinese-wav2vec2-base": ("TencentGameMate/chinese-wav2vec2-base", [
        "config.json",
        "preprocessor_config.json",
        "pytorch_model.bin",
    ]),
}

RUNNER_FACTORY = os.environ.get("MULTITALK_RUNNER", "multitalk.pipeline.runner:PipelineRunner")
RUNNER_OPTIONS = {
    "ckpt_dir": f"{WEIGHTS_DIR}/Wan2.1-I2V-14B-480P",
    "multitalk_dir": f"{WEIGHTS_DIR}/MeiGen-MultiTalk",
    "wav2vec_dir": f"{WEIGHTS_DIR}/chinese-wav2vec2-base",
    "device": "cuda",
}

app = modal.App(APP_NAME)

weights_volume = modal.Volume.from_name("multitalk-weights", create_if_missing=True)
state_volume = modal.Volume.from_name("multitalk-state", create_if_missing=True)
s3_secret = modal.Secret.from_name("multitalk-s3")
api_secret = modal.Secret.from_name("multitalk-api")


def _ignore(path: Path) -> bool:
    parts = set(Path(path).parts)
    return bool(parts & {".venv", ".git", "outputs", "__pycache__", ".pytest_cache", "tests",
                         "benchmarks"}) or str(path).endswith(".egg-info")


download_image = modal.Image.debian_slim(python_version="3.11").pip_install(
    "huggingface_hub>=0.30", "hf-xet")

image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(f"torch=={TORCH_VERSION}")            # the CUDA build from PyPI
    .add_local_dir(REPO, REMOTE_REPO, copy=True, ignore=_ignore)
    .run_commands(f"pip install -c {REMOTE_REPO}/constraints.txt {REMOTE_REPO}")
    .env({"MULTITALK_DATA_DIR": f"{STATE_DIR}/data",
          "MULTITALK_RUNNER_OPTIONS": json.dumps(RUNNER_OPTIONS),
          "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
)


@app.function(image=download_image, volumes={WEIGHTS_DIR: weights_volume},
              timeout=DOWNLOAD_TIMEOUT_S, cpu=4.0)
def download_weights(force: bool = False) -> dict[str, int]:
    """Fetch the three weight folders into the volume (only the needed files)."""
    from huggingface_hub import snapshot_download

    sizes = {}
    for folder, (repo_id, patterns) in WEIGHT_REPOS.items():
        target = Path(WEIGHTS_DIR) / folder
        snapshot_download(repo_id=repo_id, local_dir=str(target), allow_patterns=patterns,
                          force_download=force, max_workers=8)
        sizes[folder] = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        weights_volume.commit()
    return sizes


@app.cls(image=image, gpu=GPU, volumes={WEIGHTS_DIR: weights_volume, STATE_DIR: state_volume},
         secrets=[s3_secret, api_secret], timeout=SERVICE_TIMEOUT_S,
         startup_timeout=STARTUP_TIMEOUT_S, scaledown_window=SCALEDOWN_WINDOW_S,
         max_containers=1)
@modal.concurrent(max_inputs=64)
class MultiTalkService:
    """API + worker in one GPU container; models loaded once per container."""

    @modal.enter()
    def load(self) -> None:
        from multitalk.service.cli_commands import Service
        from multitalk.service.config import ServiceConfig

        options = json.loads(os.environ.get("MULTITALK_RUNNER_OPTIONS") or "{}")
        self.service = Service(ServiceConfig.from_env(), RUNNER_FACTORY, runner_options=options)
        self.service.worker.load()                 # readiness: /readyz is 200 from here on
        self.service.start_worker()
        self._stop = threading.Event()
        self._committer = threading.Thread(target=self._commit_state, daemon=True)
        self._committer.start()

    def _commit_state(self) -> None:
        while not self._stop.wait(60):
            try:
                state_volume.commit()
            except Exception as e:  # noqa: BLE001 - a failed commit is retried next minute
                print(f"state volume commit failed: {e}")

    @modal.exit()
    def shutdown(self) -> None:
        self._stop.set()
        self.service.stop(timeout=60)
        state_volume.commit()

    @modal.asgi_app()
    def api(self):
        return self.service.app


@app.local_entrypoint()
def main(force: bool = False) -> None:
    for folder, size in download_weights.remote(force).items():
        print(f"{folder}: {size / 1e9:.1f} GB")
