"""Tenants: each token has a name; a tenant sees, cancels and downloads only its own jobs and uses
only its own uploads and idempotency keys; an admin token sees everything; queue quotas."""

from __future__ import annotations

import pytest
from service_support import job_body, wait_for

ALICE, BOB, OPS = "tok-alice-1", "tok-bob-12", "tok-ops-123"


@pytest.fixture
def tenants(make_service):
    svc = make_service(api_tokens=(f"alice:{ALICE}", f"bob:{BOB}"), admin_tokens=(f"ops:{OPS}",),
                       queue_quotas=("bob:1",), token=ALICE,
                       runner_options={"steps": 30, "step_s": 0.05})
    return svc, svc.client_for(ALICE), svc.client_for(BOB), svc.client_for(OPS)


def test_a_tenant_cannot_see_cancel_or_download_anothers_job(tenants, media):
    svc, alice, bob, ops = tenants
    a_image, a_audio = svc.upload(media["image"], alice), svc.upload(media["audio1"], alice)
    b_image, b_audio = svc.upload(media["image"], bob), svc.upload(media["audio1"], bob)
    body = job_body(a_image, a_audio, prompt="alice's [steps=1]")
    r = alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-1"})
    assert r.status_code == 202
    job = r.json()
    assert job["owner"] == "alice"
    done = svc.wait_status(job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded"

    missing = bob.get("/v1/jobs/0123456789abcdef0123456789abcdef")
    for method, path in [("GET", f"/v1/jobs/{job['id']}"),
                         ("POST", f"/v1/jobs/{job['id']}/cancel"),
                         ("GET", f"/v1/jobs/{job['id']}/video")]:
        r = bob.request(method, path)
        assert r.status_code == 404, (path, r.text)          # exactly as if it did not exist
        assert r.json()["detail"].replace(job["id"], "X") == \
            missing.json()["detail"].replace("0123456789abcdef0123456789abcdef", "X")
    assert bob.get("/v1/jobs").json()["jobs"] == []
    assert alice.get(f"/v1/jobs/{job['id']}/video").status_code == 200

    # alice's uploads are not bob's to use: the same answer as an upload that never existed
    r = bob.post("/v1/jobs", json=job_body(a_image, b_audio))
    assert r.status_code == 422
    [problem] = r.json()["detail"]
    assert problem["loc"] == ["body", "cond_image"] and "does not exist" in problem["msg"]

    # bob sending alice's idempotency key gets his own job, never hers
    mine = bob.post("/v1/jobs", json=job_body(b_image, b_audio, prompt="bob's [steps=1]"),
                    headers={"Idempotency-Key": "order-1"})
    assert mine.status_code == 202 and mine.json()["id"] != job["id"]
    assert mine.json()["owner"] == "bob"
    again = bob.post("/v1/jobs", json=job_body(b_image, b_audio, prompt="bob's [steps=1]"),
                     headers={"Idempotency-Key": "order-1"})
    assert again.json()["id"] == mine.json()["id"]                  # his own retry: his job
    same = alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-1"})
    assert same.status_code == 202 and same.json()["id"] == job["id"]

    # the admin sees both tenants' jobs and can read and download any of them
    listed = {j["id"]: j["owner"] for j in ops.get("/v1/jobs").json()["jobs"]}
    assert listed == {job["id"]: "alice", mine.json()["id"]: "bob"}
    assert ops.get(f"/v1/jobs/{job['id']}").status_code == 200
    assert ops.get(f"/v1/jobs/{job['id']}/video").status_code == 200
    assert [j["id"] for j in alice.get("/v1/jobs").json()["jobs"]] == [job["id"]]


def test_cancel_is_scoped_and_quota_is_per_tenant(tenants, media):
    svc, alice, bob, ops = tenants
    b_image, b_audio = svc.upload(media["image"], bob), svc.upload(media["audio1"], bob)
    first = bob.post("/v1/jobs", json=job_body(b_image, b_audio)).json()   # 30 steps: ~1.5 s
    r = bob.post("/v1/jobs", json=job_body(b_image, b_audio, prompt="second"))
    assert r.status_code == 429 and "quota 1" in r.json()["detail"] and r.headers["retry-after"]
    a_image, a_audio = svc.upload(media["image"], alice), svc.upload(media["audio1"], alice)
    assert alice.post("/v1/jobs", json=job_body(a_image, a_audio)).status_code == 202  # hers

    assert alice.post(f"/v1/jobs/{first['id']}/cancel").status_code == 404
    assert ops.post(f"/v1/jobs/{first['id']}/cancel").status_code == 200   # the admin can
    final = wait_for(lambda: (j := bob.get(f"/v1/jobs/{first['id']}").json())["status"]
                     in ("cancelled", "succeeded", "failed") and j, 20, "the cancel")
    assert final["status"] == "cancelled"
    # the quota counts queued and running jobs only: bob may submit again
    assert bob.post("/v1/jobs", json=job_body(b_image, b_audio, prompt="third")).status_code == 202
