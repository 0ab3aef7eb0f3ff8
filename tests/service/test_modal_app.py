"""deploy/modal_app.py declares the download function, the H100 service class, volume, secrets and
timeouts (inspected on the Modal objects; nothing is deployed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import modal  # noqa: E402  (a test dependency: the deployment module must import)

MODAL_APP = Path(__file__).resolve().parents[2] / "deploy" / "modal_app.py"


def _import(env: dict[str, str] | None = None):
    """Import the module (deploy-time ``env``) while recording the arguments of every
    ``app.function``/``app.cls``."""
    calls: dict[str, dict] = {}
    real_function, real_cls = modal.App.function, modal.App.cls

    def spy(kind, real):
        def wrapper(self, *args, **kwargs):
            decorator = real(self, *args, **kwargs)

            def apply(obj):
                result = decorator(obj)
                name = getattr(obj, "__name__", None) or result._get_name()
                calls[name] = {"kind": kind, **kwargs}
                return result

            return apply

        return wrapper

    mp = pytest.MonkeyPatch()
    mp.setattr(modal.App, "function", spy("function", real_function))
    mp.setattr(modal.App, "cls", spy("cls", real_cls))
    for key in ("MULTITALK_MODAL_DB_SECRET", "MULTITALK_MODAL_MAX_CONTAINERS"):
        mp.delenv(key, raising=False)
    for key, value in (env or {}).items():
        mp.setenv(key, value)
    try:
        spec = importlib.util.spec_from_file_location("multitalk_modal_app", MODAL_APP)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        mp.undo()
    return module, calls


@pytest.fixture(scope="module")
def deployed():
    return _import()


def test_app_declares_download_function_and_gpu_service(deployed):
    module, calls = deployed
    assert isinstance(module.app, modal.App) and module.app.name == "multitalk"
    assert isinstance(module.download_weights, modal.Function)
    assert isinstance(module.MultiTalkService, modal.Cls)

    service = calls["MultiTalkService"]
    assert service["kind"] == "cls" and service["gpu"] == "H100"
    assert service["timeout"] >= 600 and service["startup_timeout"] >= 600
    assert service["max_containers"] == 1                       # SQLite mode: one container
    assert set(service["volumes"]) == {module.WEIGHTS_DIR, module.STATE_DIR}
    assert service["volumes"][module.WEIGHTS_DIR] is module.weights_volume
    assert all(isinstance(v, modal.Volume) for v in service["volumes"].values())
    assert module.s3_secret in service["secrets"] and module.api_secret in service["secrets"]
    assert all(isinstance(s, modal.Secret) for s in service["secrets"])
    # the same on the Modal object that will be deployed
    spec = module.MultiTalkService._get_class_service_function()._spec_
    assert spec.gpus == "H100" and set(spec.volumes) == {module.WEIGHTS_DIR, module.STATE_DIR}
    assert len(spec.secrets) == 2

    download = calls["download_weights"]
    assert download["kind"] == "function" and "gpu" not in download
    assert download["volumes"] == {module.WEIGHTS_DIR: module.weights_volume}
    assert download["timeout"] >= 3600
    spec = module.download_weights._spec_
    assert spec.gpus is None and set(spec.volumes) == {module.WEIGHTS_DIR}


def test_service_loads_models_on_enter_and_serves_the_fastapi_app(deployed):
    module, _ = deployed
    from modal._partial_function import _PartialFunctionFlags as Flags
    from modal._utils.async_utils import synchronizer

    methods = module.MultiTalkService._get_partial_functions()
    flags = {name: synchronizer._translate_in(pf).flags for name, pf in methods.items()}
    assert flags["load"] & Flags.ENTER_POST_SNAPSHOT
    assert flags["shutdown"] & Flags.EXIT
    assert flags["api"] & Flags.WEB_INTERFACE
    assert module.RUNNER_OPTIONS["ckpt_dir"].startswith(module.WEIGHTS_DIR)


def test_download_fetches_only_the_needed_files(deployed):
    module, _ = deployed
    repos = {repo: patterns for repo, patterns in module.WEIGHT_REPOS.values()}
    assert set(repos) == {"Wan-AI/Wan2.1-I2V-14B-480P", "MeiGen-AI/MeiGen-MultiTalk",
                          "TencentGameMate/chinese-wav2vec2-base"}
    wan = repos["Wan-AI/Wan2.1-I2V-14B-480P"]
    for needed in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "google/umt5-xxl/*",
                   "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "config.json"):
        assert needed in wan
    assert "multitalk.safetensors" in repos["MeiGen-AI/MeiGen-MultiTalk"]
    assert all("*" != p for ps in repos.values() for p in ps)   # never the whole repo
    import fnmatch

    shard = "diffusion_pytorch_model-00003-of-00007.safetensors"
    assert any(fnmatch.fnmatch(shard, p) for p in wan)
    assert not any(fnmatch.fnmatch("xlm-roberta-large/tokenizer.json", p) for p in wan)


def test_postgres_mode_shares_the_queue_between_containers():
    module, calls = _import({"MULTITALK_MODAL_DB_SECRET": "multitalk-db",
                             "MULTITALK_MODAL_MAX_CONTAINERS": "6"})
    service = calls["MultiTalkService"]
    assert service["max_containers"] == 6
    assert module.db_secret in service["secrets"] and len(service["secrets"]) == 3
    assert len(module.MultiTalkService._get_class_service_function()._spec_.secrets) == 3


def test_sqlite_mode_snapshots_a_consistent_copy_and_restores_it(deployed, tmp_path):
    from multitalk.service.store import open_store

    module, _ = deployed
    live, snapshot = tmp_path / "local" / "jobs.sqlite3", tmp_path / "volume" / "snap.sqlite3"
    assert not module.restore_queue(snapshot, live)            # first start: nothing to restore
    store = open_store(live)
    job, _ = store.submit({"prompt": "kept"})
    module.save_queue(store, snapshot)
    store.submit({"prompt": "after the snapshot"})
    store.close()
    assert sorted(p.name for p in snapshot.parent.iterdir()) == ["snap.sqlite3"]  # no -wal
    assert module.restore_queue(snapshot, live)                # a new container
    restored = open_store(live)
    assert [j["id"] for j in restored.list()[0]] == [job["id"]]
    assert restored.lease_next("w", 30)["id"] == job["id"]
