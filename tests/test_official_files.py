"""The one description of the official weight files, against the official manifest and folders."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from safetensors.torch import save_file

from multitalk.errors import CheckpointError
from multitalk.models import official_files as of


def test_names_are_the_official_manifests(full_manifest, tiny_ckpt_dir, tiny_wav2vec_dir):
    files = {f for f in full_manifest if not f.startswith("_")}
    base, meigen = of.BASE_FOLDER, of.MULTITALK_FOLDER
    assert files == {f"{meigen}/{of.MULTITALK_FILE}", f"{base}/{of.VAE_FILE}", f"{base}/{of.T5_FILE}",
                     f"{base}/{of.CLIP_FILE}", f"{base}/diffusion_pytorch_model-*.safetensors"}
    # the golden folders were written by the official tooling, in the official layout
    for name in (of.CONFIG_FILE, of.INDEX_FILE, of.MULTITALK_FILE, of.T5_FILE, of.CLIP_FILE, of.VAE_FILE):
        assert (tiny_ckpt_dir / name).is_file(), name
    assert (tiny_ckpt_dir / of.TOKENIZER_DIR).is_dir()
    shards = sorted(p.name for p in tiny_ckpt_dir.glob(of.SHARD_GLOB))
    assert shards == [of.shard_name(1, 2), of.shard_name(2, 2)]
    assert fnmatch.fnmatch(of.shard_name(3, 7), "diffusion_pytorch_model-*.safetensors")
    assert (tiny_wav2vec_dir / of.WAV2VEC_PREPROCESSOR_FILE).is_file()
    assert any((tiny_wav2vec_dir / name).is_file() for name in of.WAV2VEC_WEIGHT_FILES)


def test_audio_keys_are_exactly_multitalk_safetensors(full_manifest):
    audio = full_manifest[f"{of.MULTITALK_FOLDER}/{of.MULTITALK_FILE}"]["keys"]
    base = full_manifest[f"{of.BASE_FOLDER}/diffusion_pytorch_model-*.safetensors"]["keys"]
    assert audio and all(of.is_audio_key(k) for k in audio)
    assert base and not any(of.is_audio_key(k) for k in base)


def test_header_reader(tmp_path):
    save_file({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.arange(4)}, str(tmp_path / "t.safetensors"))
    items = {k: t for k, t, _ in of.safetensors_shape_items(tmp_path / "t.safetensors")}
    assert items["a"].shape == (2, 3) and items["a"].dtype == torch.bfloat16 and items["a"].is_meta
    assert items["b"].dtype == torch.int64
    with pytest.raises(CheckpointError, match="not found"):
        of.read_safetensors_header(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(CheckpointError, match="cannot read safetensors header") as e:
        of.read_safetensors_header(tmp_path / "bad.safetensors")
    assert e.value.file.endswith("bad.safetensors")


def test_weights_check_reads_headers_only(tiny_ckpt_dir, tiny_wav2vec_dir, tmp_path):
    """``multitalk weights check``: every component of the golden folders found, from the headers;
    a shard whose header is broken is a reported problem naming the file, not a crash."""
    import shutil

    from multitalk.models.weights_check import check_folders

    reports = check_folders([tiny_wav2vec_dir, tiny_ckpt_dir])
    assert len(reports) == 5 and all(r.ok for r in reports), [r.summary() for r in reports]
    broken = tmp_path / "Wan2.1-I2V-tiny"
    shutil.copytree(tiny_ckpt_dir, broken)
    shard = broken / of.shard_name(1, 2)
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])
    dit = next(r for r in check_folders([broken, tiny_wav2vec_dir]) if r.component == "transformer")
    assert not dit.ok and "cannot read safetensors header" in dit.missing_files[0]
    assert of.shard_name(1, 2) in dit.missing_files[0]
