"""MultiTalk on Modal: the same job API as ``multitalk serve``, on H100 containers.

One-time setup::

    modal secret create multitalk-s3 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
        AWS_DEFAULT_REGION=... [AWS_ENDPOINT_URL=https://<s3-compatible>] \\
        MULTITALK_OUTPUT_PREFIX=s3://my-bucket/multitalk
    modal secret create multitalk-api MULTITALK_API_TOKENS=alice:<token>,bob:<token> \\
        MULTITALK_WEBHOOK_SECRET=whsec_...
    modal run deploy/modal_app.py          # downloads the weights into the volume (once)
    modal deploy deploy/modal_app.py       # serves the API (URL printed by Modal)

Each container loads the models once (``@modal.enter``), then serves the FastAPI app and runs jobs
in its in-process worker. Two modes for the job queue:

* **Postgres** (several containers): put ``MULTITALK_DB=postgresql://...`` of a managed Postgres
  in a Modal secret and deploy with ``MULTITALK_MODAL_DB_SECRET=<that secret's name>`` (and
  optionally ``MULTITALK_MODAL_MAX_CONTAINERS``, default 4). Every container shares the queue;
  outputs must go to S3 (``MULTITALK_OUTPUT_PREFIX``) and inputs come from s3:// or https:// (an
  upload lands on one container's volume path, which the others also see through the Volume
  only after a commit: prefer s3 inputs).
* **SQLite** (default, one container, ``max_containers=1``): the database lives on the
  container's local disk; at start it is restored from the last snapshot on the ``multitalk-state``
  Volume, and every minute (and at exit) SQLite's online backup writes a consistent snapshot there
  before the Volume is committed. The live WAL database is never copied. A container that dies
  without its exit hook loses at most the last minute of queue changes; a job interrupted that way
  runs again (lease expiry). Keep clients polling (or set ``min_containers=1``): an idle
  container may be scaled down.
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

LOCAL_DB = "/tmp/multitalk/jobs.sqlite3"               # SQLite mode: the live database
SNAPSHOT = f"{STATE_DIR}/jobs-snapshot.sqlite3"         # SQLite mode: its copy on the Volume
SNAPSHOT_EVERY_S = 60

# Postgres mode: chosen when deploying (the secret holds MULTITALK_DB=postgresql://...)
DB_SECRET = os.environ.get("MULTITALK_MODAL_DB_SECRET", "")
MAX_CONTAINERS = int(os.environ.get("MULTITALK_MODAL_MAX_CONTAINERS", "4")) if DB_SECRET else 1

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
secrets = [s3_secret, api_secret]
if DB_SECRET:
    db_secret = modal.Secret.from_name(DB_SECRET)
    secrets.append(db_secret)


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
          "MULTITALK_METRICS_DIR": "/tmp/multitalk/metrics",     # mmap files: never on a Volume
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
         secrets=secrets, timeout=SERVICE_TIMEOUT_S,
         startup_timeout=STARTUP_TIMEOUT_S, scaledown_window=SCALEDOWN_WINDOW_S,
         max_containers=MAX_CONTAINERS)
@modal.concurrent(max_inputs=64)
class MultiTalkService:
    """API + worker in one GPU container; models loaded once per container."""

    @modal.enter()
    def load(self) -> None:
        from multitalk.service.cli_commands import Service
        from multitalk.service.config import ServiceConfig
        from multitalk.service.store import is_postgres_url

        options = json.loads(os.environ.get("MULTITALK_RUNNER_OPTIONS") or "{}")
        self.sqlite = not is_postgres_url(os.environ.get("MULTITALK_DB", ""))
        overrides = {}
        if self.sqlite:
            restore_queue(SNAPSHOT, LOCAL_DB)
            overrides["db"] = f"sqlite:///{LOCAL_DB}"
        self.service = Service(ServiceConfig.from_env(**overrides), RUNNER_FACTORY,
                               runner_options=options)
        self.service.worker.load()                 # readiness: /readyz is 200 from here on
        self.service.start_worker()
        self._stop = threading.Event()
        self._saver = threading.Thread(target=self._save_state, daemon=True)
        self._saver.start()

    def _save_state(self) -> None:
        while not self._stop.wait(SNAPSHOT_EVERY_S):
            self._snapshot()

    def _snapshot(self) -> None:
        try:
            if self.sqlite:
                save_queue(self.service.store, SNAPSHOT)
            state_volume.commit()                  # uploads and local outputs too
        except Exception as e:  # noqa: BLE001 - a failed snapshot is retried next minute
            print(f"state snapshot failed: {e}")

    @modal.exit()
    def shutdown(self) -> None:
        self._stop.set()
        self.service.stop(timeout=60)
        self._snapshot()

    @modal.asgi_app()
    def api(self):
        return self.service.app


def restore_queue(snapshot: str | Path, live: str | Path) -> bool:
    """SQLite mode: start from the Volume's last snapshot (if any) as the live database."""
    import shutil

    snapshot, live = Path(snapshot), Path(live)
    live.parent.mkdir(parents=True, exist_ok=True)
    if not snapshot.is_file():
        return False
    for stale in (live, live.with_name(live.name + "-wal"), live.with_name(live.name + "-shm")):
        stale.unlink(missing_ok=True)
    shutil.copyfile(snapshot, live)
    return True


def save_queue(store, snapshot: str | Path) -> Path:
    """SQLite mode: a consistent snapshot of the live database onto the Volume (online backup,
    written beside and renamed: the Volume never holds a half-written or WAL-torn file)."""
    return store.backup(snapshot)


@app.local_entrypoint()
def main(force: bool = False) -> None:
    for folder, size in download_weights.remote(force).items():
        print(f"{folder}: {size / 1e9:.1f} GB")
