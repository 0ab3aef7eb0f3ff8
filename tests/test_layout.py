"""Finding and streaming the DiT files in every supported folder layout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from multitalk.errors import CheckpointError
from multitalk.models.checkpoint import read_safetensors
from multitalk.models.layout import find_dit_files, iter_dit_tensors
from multitalk.models.official_files import INDEX_FILE, MULTITALK_FILE, is_audio_key
from multitalk.models.transformer import load_transformer

SHARDS = ("diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors")


def _link(src, dst):
    dst.symlink_to(src)


def _weight_map(tiny_ckpt_dir) -> dict[str, str]:
    return json.loads((tiny_ckpt_dir / INDEX_FILE).read_text())["weight_map"]


def _wan_base(tmp_path, tiny_ckpt_dir, index: str = "wan"):
    """A base folder with the 2 shards and config; ``index`` = "wan" (base keys only), "meigen" or "none"."""
    base = tmp_path / "Wan2.1-I2V-14B-480P"
    base.mkdir()
    for name in (*SHARDS, "config.json"):
        _link(tiny_ckpt_dir / name, base / name)
    weight_map = _weight_map(tiny_ckpt_dir)
    if index == "wan":
        weight_map = {k: f for k, f in weight_map.items() if not is_audio_key(k)}
    if index != "none":
        (base / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return base


def _meigen(tmp_path, tiny_ckpt_dir):
    meigen = tmp_path / "MeiGen-MultiTalk"
    meigen.mkdir()
    _link(tiny_ckpt_dir / MULTITALK_FILE, meigen / MULTITALK_FILE)
    shutil.copy(tiny_ckpt_dir / INDEX_FILE, meigen / INDEX_FILE)
    return meigen


@pytest.fixture(scope="module")
def reference_state(tiny_ckpt_dir):
    return load_transformer(tiny_ckpt_dir).state_dict()


def _assert_same_model(ckpt, multitalk_dir, reference_state):
    state = load_transformer(ckpt, multitalk_dir).state_dict()
    assert state.keys() == reference_state.keys()
    assert all(torch.equal(state[k], reference_state[k]) for k in state)


def test_copied_in_layout(tiny_ckpt_dir):
    files = find_dit_files(tiny_ckpt_dir)
    assert [p.name for p in files.shard_paths] == list(SHARDS)
    assert files.multitalk_path == tiny_ckpt_dir / MULTITALK_FILE
    keys = [k for k, _, _ in iter_dit_tensors(files)]
    assert sorted(keys) == sorted(_weight_map(tiny_ckpt_dir)) and len(keys) == len(set(keys))


def test_separate_meigen_folder(tmp_path, tiny_ckpt_dir, reference_state):
    base, meigen = _wan_base(tmp_path, tiny_ckpt_dir, "wan"), _meigen(tmp_path, tiny_ckpt_dir)
    files = find_dit_files(base, meigen)
    assert files.multitalk_path == meigen / MULTITALK_FILE and len(files.shard_paths) == 2
    _assert_same_model(base, meigen, reference_state)


def test_wan_index_without_multitalk_is_a_clear_error(tmp_path, tiny_ckpt_dir):
    base = _wan_base(tmp_path, tiny_ckpt_dir, "wan")
    with pytest.raises(CheckpointError) as e:
        find_dit_files(base)
    assert "multitalk_dir" in str(e.value) and MULTITALK_FILE in str(e.value)
    with pytest.raises(CheckpointError) as e:
        find_dit_files(base, tmp_path)             # a folder without multitalk.safetensors
    assert e.value.file.endswith(MULTITALK_FILE)


def test_index_naming_missing_files_falls_back_to_shards(tmp_path, tiny_ckpt_dir, reference_state):
    """MeiGen's index (naming multitalk.safetensors and 7-shard names) copied in without the files it names."""
    base = _wan_base(tmp_path, tiny_ckpt_dir, "none")
    weight_map = {k: ("diffusion_pytorch_model-00003-of-00007.safetensors" if not is_audio_key(k) else f)
                  for k, f in _weight_map(tiny_ckpt_dir).items()}
    (base / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    meigen = _meigen(tmp_path, tiny_ckpt_dir)
    assert [p.name for p in find_dit_files(base, meigen).shard_paths] == list(SHARDS)
    _assert_same_model(base, meigen, reference_state)


def test_no_index_globs_shards(tmp_path, tiny_ckpt_dir):
    base = _wan_base(tmp_path, tiny_ckpt_dir, "none")
    _link(tiny_ckpt_dir / MULTITALK_FILE, base / MULTITALK_FILE)
    files = find_dit_files(base)
    assert [p.name for p in files.shard_paths] == list(SHARDS) and files.multitalk_path.parent == base


def test_wrong_shape_names_file_key_and_shape(tmp_path, tiny_ckpt_dir):
    base = _wan_base(tmp_path, tiny_ckpt_dir, "wan")
    meigen = _meigen(tmp_path, tiny_ckpt_dir)
    shard = base / SHARDS[0]
    tensors = load_file(str(shard.resolve()))
    tensors["blocks.0.self_attn.q.weight"] = tensors["blocks.0.self_attn.q.weight"][:, :32].contiguous()
    shard.unlink()
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError) as e:
        load_transformer(base, meigen)
    err = e.value
    assert err.file == SHARDS[0] and err.key == "blocks.0.self_attn.q.weight"
    assert err.expected == (64, 64) and err.got == (64, 32)
    assert SHARDS[0] in str(err) and "expected shape=(64, 64)" in str(err)


def test_missing_tensor_is_a_checkpoint_error(tmp_path, tiny_ckpt_dir):
    meigen = tmp_path / "MeiGen-MultiTalk"
    meigen.mkdir()
    audio = load_file(str(tiny_ckpt_dir / MULTITALK_FILE))
    del audio["blocks.1.norm_x.weight"]
    save_file(audio, str(meigen / MULTITALK_FILE))
    base = _wan_base(tmp_path, tiny_ckpt_dir, "wan")
    with pytest.raises(CheckpointError) as e:
        load_transformer(base, meigen)
    assert e.value.key == "blocks.1.norm_x.weight" and e.value.expected == (64,)


def test_read_casts_in_chunks(tmp_path, monkeypatch):
    import multitalk.models.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_CHUNK_BYTES", 1000)   # force many (unaligned) chunks
    x = torch.randn(37, 29)
    save_file({"a": x, "ids": torch.arange(5)}, str(tmp_path / "t.safetensors"))
    got = dict((k, t) for k, t, _ in read_safetensors(tmp_path / "t.safetensors", dtype_for=lambda k: torch.bfloat16))
    assert got["a"].dtype == torch.bfloat16 and torch.equal(got["a"], x.to(torch.bfloat16))
    assert torch.equal(got["ids"], torch.arange(5))


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError):
        find_dit_files(tmp_path / "nope")
    with pytest.raises(CheckpointError) as e:
        find_dit_files(tmp_path)
    assert "config.json" in str(e.value)
