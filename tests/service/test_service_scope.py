"""Storage scope: S3 only inside MULTITALK_S3_ALLOW, local paths only under MULTITALK_LOCAL_ROOT
(symlinks resolved), and a location outside the scope answered exactly like a missing one."""

from __future__ import annotations

import os

import pytest
from service_support import job_body

from multitalk.errors import UserInputError
from multitalk.service.config import ServiceConfig
from multitalk.service.storage import Storage, StorageError


def _msg(r, field: str) -> str:
    assert r.status_code == 422, r.text
    return next(d["msg"] for d in r.json()["detail"]
                if ".".join(map(str, d["loc"][1:])) == field)


def test_bucket_outside_the_allow_list_is_answered_like_a_missing_object(make_service, moto,
                                                                          media):
    fs = moto.fs()
    fs.mkdir("secrets")
    fs.put_file(str(media["audio1"]), "secrets/voice.wav")          # exists, but out of scope
    fs.put_file(str(media["audio1"]), "inputs/team/voice.wav")
    svc = make_service(s3_endpoint_url=moto.endpoint, s3_allow=("inputs/team", "outputs/mt"))
    image = svc.upload(media["image"])

    def answer(uri: str) -> str:
        r = svc.client.post("/v1/jobs", json=job_body(image, uri))
        return _msg(r, "cond_audio.person1").replace(uri, "<uri>")

    refused, missing = answer("s3://secrets/voice.wav"), answer("s3://inputs/team/nope.wav")
    assert refused == missing == "<uri> does not exist or this server may not read it"
    assert answer("s3://inputs/teamX/voice.wav") == missing        # prefixes match whole segments
    ok = svc.submit(job_body(image, "s3://inputs/team/voice.wav", output="s3://outputs/mt/a"))
    assert svc.wait_status(ok["id"], {"succeeded", "failed"})["status"] == "succeeded"
    r = svc.client.post("/v1/jobs", json=job_body(image, "s3://inputs/team/voice.wav",
                                                  output="s3://secrets/stolen"))
    assert "may not write to s3://secrets/stolen" in _msg(r, "output")
    assert not fs.exists("secrets/stolen")


def test_default_scope_is_the_output_prefix_only(tmp_path, moto, media):
    moto.fs().put_file(str(media["audio1"]), "inputs/voice.wav")
    st = Storage(ServiceConfig(data_dir=tmp_path, s3_endpoint_url=moto.endpoint,
                               output_prefix="s3://outputs/multitalk"))
    with pytest.raises(UserInputError, match="does not exist or this server may not read"):
        st.fetch("cond_audio.person1", "s3://inputs/voice.wav", tmp_path / "in")   # worker too
    with pytest.raises(StorageError, match="outside"):
        st.put_output(media["audio1"], "s3://inputs/x.mp4")
    assert st.put_output(media["audio1"], "s3://outputs/multitalk/j.mp4")
    assert Storage(ServiceConfig(data_dir=tmp_path)).s3_in_scope("outputs", "x") is False


def test_symlink_escape_from_the_local_root_is_refused(make_service, media, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.wav").write_bytes(media["audio1"].read_bytes())
    (root / "voice.wav").write_bytes(media["audio1"].read_bytes())
    (root / "face.png").write_bytes(media["image"].read_bytes())
    os.symlink(outside / "secret.wav", root / "link.wav")
    os.symlink(outside, root / "out-link")
    svc = make_service(local_root=root)

    def answer(uri: str) -> str:
        r = svc.client.post("/v1/jobs", json=job_body(str(root / "face.png"), uri))
        return _msg(r, "cond_audio.person1").replace(uri, "<uri>")

    assert answer(str(root / "link.wav")) == answer(str(root / "nope.wav")) == \
        answer(str(outside / "secret.wav")) == "<uri> does not exist or this server may not read it"
    assert "traversal" in answer(f"{root}/../outside/secret.wav")
    r = svc.client.post("/v1/jobs", json=job_body(str(root / "face.png"), str(root / "voice.wav"),
                                                  output=str(root / "out-link" / "videos")))
    assert "may not write" in _msg(r, "output")
    job = svc.submit(job_body(str(root / "face.png"), f"FILE://{root / 'voice.wav'}",
                              output=str(root / "videos")))
    done = svc.wait_status(job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    assert (root / "videos" / f"{job['id']}.mp4").is_file()
    assert list(outside.iterdir()) == [outside / "secret.wav"]      # nothing written outside


def test_local_paths_are_refused_without_a_local_root(tmp_path, media):
    st = Storage(ServiceConfig(data_dir=tmp_path))
    with pytest.raises(UserInputError, match="MULTITALK_LOCAL_ROOT"):
        st.check_input("cond_image", str(media["image"]))
