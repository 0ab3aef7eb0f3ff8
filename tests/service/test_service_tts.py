"""Speech from text through the service: ``tts_audio`` (the official format) in the job body, spoken
by the worker with espeak-ng, through the REAL pipeline on the tiny preset (fixtures of
``test_service_pipeline.py``: uvicorn on loopback, moto S3, in-process worker)."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from test_service_pipeline import (SHORT, JOB_TIMEOUT, demo, finished, pipeline_service, probe,  # noqa: F401
                                   s3, tiny_home, watch)

from multitalk.media.speech_synthesis import espeak_program

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400),
              pytest.mark.skipif(espeak_program() is None, reason="espeak-ng not installed (.ci/run installs it)")]

DIALOGUE = {"text": "(s1) Do you know multi-talk? (s2) Yes, I know it!", "human1_voice": "en-us",
            "human2_voice": "en-gb+f3"}


def test_tts_job_speaks_the_text_and_refuses_voices_it_cannot_speak(pipeline_service, demo):
    svc, fs = pipeline_service, pipeline_service.moto.fs()
    body = {"prompt": "two people talking", "cond_image": s3(demo, "image"), "cond_audio": {},
            "tts_audio": DIALOGUE, "audio_type": "add", "bbox": demo["bbox"], "output": "s3://outputs/tts/",
            "params": dict(SHORT)}
    job, _ = watch(svc, svc.submit(body)["id"], finished, JOB_TIMEOUT)
    assert job["status"] == "succeeded", job["error"]
    assert job["request"]["tts_audio"]["text"] == DIALOGUE["text"]
    data = fs.cat(job["result"]["video_uri"][len("s3://"):])
    info = probe(data)
    assert info["audio"] == "aac" and info["frames"] == 5
    with av.open(io.BytesIO(data)) as f:
        sound = np.concatenate([fr.to_ndarray().ravel() for fr in f.decode(audio=0)])
    assert np.abs(sound).max() > 0.01       # the synthesised speech is in the video's sound track

    # a Kokoro voice on a server without --tts_dir: bad input naming the voice field, not a stand-in
    kokoro = dict(body, tts_audio={**DIALOGUE, "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt"})
    job, _ = watch(svc, svc.submit(kokoro)["id"], finished, JOB_TIMEOUT)
    assert job["status"] == "failed" and job["error"]["code"] == "bad_input", job
    assert job["error"]["field"] == "tts_audio.human1_voice" and "--tts_dir" in job["error"]["hint"]

    # refused at submission: both kinds of speech, or a third speaker
    both = dict(body, cond_audio={"person1": s3(demo, "person1")})
    r = svc.client.post("/v1/jobs", json=both)
    assert r.status_code == 422 and "not both" in r.text
    r = svc.client.post("/v1/jobs", json=dict(body, tts_audio={"text": "(s1) hi (s3) who?"}))
    assert r.status_code == 422 and "(s3): MultiTalk has persons 1 and 2" in r.text
