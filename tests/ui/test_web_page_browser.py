"""The web page in a real browser: ``multitalk ui --preset tiny`` on loopback, Debian's chromium
driven by Playwright.

One session does what a user does: upload the demo image (the default left/right boxes appear on
it), drag a box and type a coordinate, upload speaker 1's demo recording, type a line for speaker 2
and hear it, pick the fast LoRA recipe (a random LoRA for the tiny DiT given with ``--lora_dir``),
set small options (preview bucket, one 9-frame clip, 2 steps), generate, watch the
progress, play the video and download it, cancel a longer job while it samples, then try one bad
input. Every request the browser makes
must stay on loopback (nothing phones home). Timings of each phase are printed (``-s``) and
saved next to the screenshot in the test's temp folder.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from page_support import CHROMIUM, CHROMIUM_FLAGS, Server, free_port, offline_env  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from safetensors.torch import save_file  # noqa: E402

from multitalk.cli import app  # noqa: E402
from multitalk.models.architecture import TINY  # noqa: E402
from multitalk.models.lora import random_official_lora  # noqa: E402
from multitalk.media.speech_synthesis import espeak_program  # noqa: E402
from multitalk.pipeline.demo_inputs import write_demo_inputs  # noqa: E402

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.timeout(400),
              pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                                 reason="chromium not installed (.ci/run installs it)"),
              pytest.mark.skipif(espeak_program() is None and not os.environ.get("CI"),
                                 reason="espeak-ng not installed (.ci/run installs it)")]

LINE = "Hello! Nice to meet you."


def readme_screenshot(full: Path, out: Path, width: int = 960, colours: int = 96) -> None:
    """A small PNG of the page for the README (scaled, palette colours: well under 300 KB)."""
    from PIL import Image

    img = Image.open(full).convert("RGB")
    img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img.quantize(colours, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("page")
    port = free_port()
    lora = tmp / "lightx2v-test.safetensors"   # a random LoRA for the tiny DiT: the fast recipes appear
    save_file(random_official_lora(TINY.dit, rank=4, seed=1), str(lora))
    t0 = time.monotonic()
    server = Server(["ui", "--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--port", str(port),
                     "--data-dir", str(tmp / "data"), "--lora_dir", str(lora)], offline_env(tmp / "home"),
                    tmp / "ui.log", f"http://127.0.0.1:{port}")
    server.wait()
    server.started_s = time.monotonic() - t0
    server.tmp = tmp
    yield server
    server.stop()


def test_page_generates_a_video_from_audio_and_text(page_server, tmp_path):
    demo = json.loads(write_demo_inputs(tmp_path / "demo").read_text())
    image, audio1 = tmp_path / "demo" / demo["cond_image"], tmp_path / "demo" / demo["cond_audio"]["person1"]
    timings = {"server_start_s": page_server.started_s}
    seen_progress: list[str] = []
    outside: list[str] = []

    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
            (page_server.url, "data:", "blob:")) else None)
        t0 = time.monotonic()
        page.goto(page_server.url)

        # the image: the official default boxes (left/right halves, 5 % margin) are drawn on it
        page.locator("#mt-image input[type=file]").set_input_files(str(image))
        box2 = page.locator("#mt-boxes .mt-box-2")
        box2.wait_for(timeout=60_000)
        left = page.locator("#mt-box2-left input")
        page.locator("#mt-box-numbers").get_by_text("Box coordinates").click()
        page.wait_for_function("() => document.querySelector('#mt-box2-left input').value === '537'")
        # drag the blue box 40 screen pixels to the left: its left edge moves in source pixels
        bb = box2.bounding_box()
        page.mouse.move(bb["x"] + bb["width"] / 2, bb["y"] + bb["height"] / 2)
        page.mouse.down()
        page.mouse.move(bb["x"] + bb["width"] / 2 - 40, bb["y"] + bb["height"] / 2, steps=6)
        page.mouse.up()
        page.wait_for_function("() => +document.querySelector('#mt-box2-left input').value < 537")
        assert 400 < int(left.input_value()) < 537
        # typed numbers move the drawn box back
        left.fill("537")
        left.press("Enter")
        page.wait_for_function("() => document.querySelector('#mt-boxes .mt-box-2').style.left.startsWith('52.4')")

        # speaker 1: the demo recording; speaker 2: text, heard before generating
        page.locator("#mt-audio1 input[type=file]").set_input_files(str(audio1))
        page.locator("#mt-source2").get_by_text("Text to speak").click()
        page.locator("#mt-text2 textarea").fill(LINE)
        page.locator("#mt-hear2").click()
        page.locator("#mt-heard2 audio[src]").wait_for(state="attached", timeout=60_000)
        page.locator("#mt-prompt textarea").fill(demo["prompt"])

        # the fast recipe (the LoRA merged for this job) fills the sampling options ...
        page.locator("#mt-advanced").get_by_text("Advanced settings").click()
        page.locator("#mt-steps input").wait_for()
        page.locator("#mt-recipe").get_by_text("Fast: lightx2v").click()
        page.wait_for_function("() => document.querySelector('#mt-steps input').value === '4'")
        # ... then small settings: preview bucket (the tiny preset's default), one 9-frame clip, 2 steps
        page.locator("#mt-mode input").click()
        page.get_by_role("option", name="One clip").click()
        for elem, value in (("#mt-steps", "2"), ("#mt-frame-num", "9")):
            page.locator(f"{elem} input").fill(value)
            page.locator(f"{elem} input").press("Tab")
        page.locator("#mt-audio1 audio[src], #mt-audio1 .waveform-container").first.wait_for(
            state="attached", timeout=60_000)
        timings["inputs_s"] = time.monotonic() - t0

        t1 = time.monotonic()
        page.locator("#mt-generate").click()
        status = page.locator("#mt-progress")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if page.locator("#mt-error[role=alert]").count():
                raise AssertionError(page.locator("#mt-error").inner_text())
            if status.count():
                text = status.inner_text().strip()
                if text and (not seen_progress or seen_progress[-1] != text):
                    seen_progress.append(text)
                if status.get_attribute("data-status") in ("succeeded", "failed", "cancelled"):
                    break
            time.sleep(0.1)
        timings["generation_s"] = time.monotonic() - t1
        print(f"\ngeneration: {timings['generation_s']:.1f} s, progress seen: {seen_progress}")
        assert status.get_attribute("data-status") == "succeeded", seen_progress
        assert "LoRA lightx2v-test.safetensors" in status.inner_text()

        # the player: metadata loaded, a duration of 9 frames at 25 fps
        page.wait_for_function("() => { const v = document.querySelector('#mt-video video');"
                               " return v && v.readyState >= 1 && v.duration > 0 }", timeout=60_000)
        duration = page.evaluate("() => document.querySelector('#mt-video video').duration")
        assert abs(duration - 9 / 25) < 0.1, duration
        # the download link serves the mp4, with its sound track
        href = page.locator("#mt-download a[href]").first.get_attribute("href")
        data = page.request.get(href).body()
        with av.open(io.BytesIO(data)) as f:
            assert f.streams.video[0].codec_context.name == "h264"
            assert f.streams.audio[0].codec_context.name == "aac"
            sound = np.concatenate([fr.to_ndarray().ravel() for fr in f.decode(audio=0)])
        assert np.abs(sound).max() > 0.01
        history = page.locator("#mt-history").inner_text()
        assert "succeeded" in history
        shot = page_server.tmp / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("MULTITALK_UI_SCREENSHOT"):   # the README's picture: the same page, smaller
            readme_screenshot(shot, Path(os.environ["MULTITALK_UI_SCREENSHOT"]))

        # a long job (40 steps) is cancelled from the page while it samples
        page.locator("#mt-steps input").fill("40")
        page.locator("#mt-steps input").press("Tab")
        page.locator("#mt-generate").click()
        page.wait_for_function("() => (document.querySelector('#mt-progress') || {}).innerText?.includes('/40')",
                               timeout=120_000)
        page.wait_for_function("() => document.querySelector('#mt-progress').innerText.includes('left')",
                               timeout=120_000)
        sampling = page.locator("#mt-progress").inner_text()   # clip, step and time left
        assert re.search(r"Clip 1/\d+ · step \d+/40 · sampling · about \d+ (s|min \d+ s) left", sampling), sampling
        t2 = time.monotonic()
        page.locator("#mt-cancel").click()
        page.locator("#mt-progress[data-status=cancelled]").wait_for(timeout=60_000)
        timings["cancel_s"] = time.monotonic() - t2
        assert "cancelled" in page.locator("#mt-history").inner_text()

        # one bad input: speaker 2's box beyond the image's right edge -> the CLI's message
        page.locator("#mt-box2-right input").fill("5000")
        page.locator("#mt-box2-right input").press("Enter")
        page.wait_for_function("() => document.querySelector('#mt-boxes .mt-box-2').style.width.length > 0")
        page.locator("#mt-generate").click()
        page.locator("#mt-error[role=alert]").wait_for(timeout=60_000)
        shown = page.locator("#mt-error").inner_text().strip()
        browser.close()
    # ... worded as `multitalk generate` words the same boxes
    bad = dict(demo, cond_image=str(image), cond_audio={"person1": str(audio1), "person2": str(audio1)},
               bbox={"person1": [28, 25, 547, 486], "person2": [28, 537, 547, 5000]})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    cli = CliRunner().invoke(app, ["generate", str(tmp_path / "bad.json"), "--preset", "tiny", "--quiet",
                                   "--out", str(tmp_path / "bad.mp4")])
    assert cli.exit_code == 2, cli.output
    cli_line = next(ln for ln in cli.stderr.splitlines() if ln.startswith("error: "))[len("error: "):]
    assert cli_line.startswith("bbox: person2: [28.0, 537.0, 547.0, 5000.0] lies outside")
    assert shown == f"⚠ {cli_line}"

    timings["progress_seen"] = seen_progress
    (page_server.tmp / "timings.json").write_text(json.dumps(timings, indent=1))
    print(f"\npage timings: {json.dumps(timings)}\nscreenshot: {shot}")
    assert outside == [], f"the page made requests outside the server: {outside}"
