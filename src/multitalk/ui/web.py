"""The web page (Gradio): ``multitalk ui``.

Image with the speakers' boxes on it (drag or type), one or two speakers with an audio file, a
microphone recording or text to speak (heard before generating), add/para, prompt, recipe,
resolution, length, seed, advanced settings folded away; progress with clip, step and ETA; the
video with a download link; the history of past jobs. Bad input shows the CLI's one-line message.

The page only builds the official input (``InputSpec``) and options (``GenerationParams``) with the
pipeline's own validation and hands them to a backend: :class:`~multitalk.ui.jobs.LocalJobs` (the
pipeline in this process) or :class:`~multitalk.ui.api_client.ApiJobs` (a ``multitalk serve``).
Text is spoken where the page runs (espeak-ng, or Kokoro with ``--tts_dir``) so what is heard is
what is used. Gradio's telemetry is off (``GRADIO_ANALYTICS_ENABLED=False``) and the page loads
nothing from outside the server (system fonts).
"""


import html
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from multitalk.errors import UserInputError

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # before gradio is imported anywhere

log = logging.getLogger(__name__)

SOURCES = ("Audio file or microphone", "Text to speak")
AUDIO_TYPES = {"add: one after the other": "add", "para: at the same time": "para"}
SIZES = {"480p (multitalk-480)": "multitalk-480", "720p (multitalk-720)": "multitalk-720",
         "Preview (quarter of 480p, quick on a CPU)": "preview"}
MODES = {"Whole audio (streaming)": "streaming", "One clip": "clip"}
ESPEAK_VOICES = ["en-us", "en-us+f3", "en-gb", "en-gb+f3", "fr", "fr+f3", "de", "de+f3", "es", "es+f3", "it",
                 "pt-br", "cmn", "ja", "hi"]
POLL_S = 0.4
BOX_LABELS = ("top", "left", "bottom", "right")


@dataclass(frozen=True)
class Recipe:
    """A named set of defaults for the sampling options (the page's recipe choice)."""

    key: str
    label: str
    params: dict
    lora: str | None = None          # the LoRA file the recipe is made for (fast recipes)


QUALITY = Recipe("quality", "Quality: 40 steps", {"sample_steps": 40, "sample_shift": None,
                                                  "text_guide_scale": 5.0, "audio_guide_scale": 4.0})


def available_recipes(lora_recipes: dict[str, Recipe] | None = None) -> list[Recipe]:
    """Quality always; the fast LoRA recipes only when their LoRA files are configured."""
    return [QUALITY, *(lora_recipes or {}).values()]


def lora_recipes(loras: list[dict] | None) -> dict[str, Recipe]:
    """The pipeline's few-step recipes (``pipeline.inputs.RECIPES``), offered when LoRA files are
    configured (``loras``: ``[{"uri", "scale"}]``, merged for the jobs that pick one of them)."""
    if not loras:
        return {}
    from multitalk.pipeline import inputs

    names = ", ".join(Path(lora["uri"]).name for lora in loras)
    return {name: Recipe(name, f"Fast: {name}, {p['sample_steps']} steps (LoRA {names})", dict(p), lora=names)
            for name, p in getattr(inputs, "RECIPES", {}).items()}


@dataclass
class PageDefaults:
    """The options the page starts with (``page_defaults`` picks them per preset)."""

    size: str = "multitalk-480"
    mode: str = "streaming"
    sample_steps: int = 40
    frame_num: int = 81
    motion_frame: int = 25
    color_correction_strength: float = 1.0
    seed: int = 42
    extra: dict = field(default_factory=dict)


def page_defaults(preset: str | None) -> PageDefaults:
    """Real weights: the official defaults. Tiny preset: the demo's quick CPU settings."""
    if preset == "tiny":
        return PageDefaults(size="preview", mode="streaming", sample_steps=4, frame_num=33, motion_frame=5,
                            color_correction_strength=0.0)
    return PageDefaults()


# ---------------------------------------------------------------------------------------------
# pure helpers (tested without a browser)


def _number(v):
    """A typed box coordinate: an int when it is whole (so messages read like the CLI's)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return v
    return int(v) if float(v).is_integer() else float(v)


def build_inputs(*, image: str | None, prompt: str, two: bool, audio_type: str, boxes: list | None,
                 speakers: list[dict], speech_dir: Path, synthesizer, params: dict):
    """The page's fields -> ``(InputSpec, GenerationParams, warnings)`` with the pipeline's validation.

    ``speakers``: per person ``{"source": "audio"|"text", "audio": path, "text": str, "voice": str}``;
    text is spoken into ``speech_dir`` first. Raises :class:`UserInputError` (CLI wording).
    """
    from multitalk.pipeline.inputs import GenerationParams, InputSpec
    from multitalk.pipeline.speech_from_text import speak_line

    if not image:
        raise UserInputError("cond_image", "missing", "upload the reference image")
    warnings: list[str] = []
    cond_audio = {}
    for i, sp in enumerate(speakers[:2 if two else 1], start=1):
        if sp.get("source") == "text":
            path, notes = speak_line(sp.get("text") or "", sp.get("voice") or "en-us", speech_dir / f"person{i}.wav",
                                     synthesizer, field=f"tts_audio.text (person {i})",
                                     voice_field=f"tts_audio.human{i}_voice")
            warnings += notes
            cond_audio[f"person{i}"] = str(path)
        elif sp.get("audio"):
            cond_audio[f"person{i}"] = str(sp["audio"])
        else:
            raise UserInputError(f"cond_audio.person{i}", "missing",
                                 "upload or record the speech, or choose 'Text to speak'")
    data = {"prompt": prompt or "", "cond_image": str(image), "cond_audio": cond_audio, "audio_type": audio_type}
    if two and boxes:
        data["bbox"] = {f"person{i + 1}": [_number(v) for v in box] for i, box in enumerate(boxes[:2])}
    spec = InputSpec.from_dict(data)
    options = {k: v for k, v in params.items() if v is not None and v != ""}
    return spec, GenerationParams.from_dict(options), warnings


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"about {seconds} s left" if seconds < 90 else f"about {seconds // 60} min {seconds % 60:02d} s left"


def progress_html(job) -> str:
    """The progress line of a job: status, clip i/n, step i/n, stage, ETA, and a bar."""
    if job is None:
        return "<div id='mt-progress' data-status='idle'></div>"
    pct = 100.0 * (1.0 if job.status == "succeeded" else job.progress or 0.0)
    parts = []
    if job.status == "queued":
        parts.append("Queued")
    elif job.status == "running":
        if job.clip:
            parts.append(f"Clip {job.clip[0]}/{job.clip[1]}")
        if job.step and job.stage in ("sampling", "decoding"):
            parts.append(f"step {job.step[0]}/{job.step[1]}")
        parts.append(job.stage or "starting")
        parts.append(_eta(job.eta_s))
    elif job.status == "succeeded":
        took = (job.finished_at or 0) - (job.started_at or job.created_at)
        parts.append(f"Done in {took:.0f} s: {job.frames} frames ({job.duration_s:.2f} s), "
                     f"{job.width}x{job.height}, seed {job.seed}")
        if job.extra.get("loras"):
            parts.append(f"LoRA {', '.join(job.extra['loras'])}")
    elif job.status == "cancelled":
        parts.append("Cancelled")
    else:
        parts.append("Failed")
    text = " · ".join(p for p in parts if p)
    return (f"<div id='mt-progress' data-status='{job.status}' data-job='{html.escape(job.id)}'>"
            f"<div class='mt-bar'><div style='width:{pct:.1f}%'></div></div>"
            f"<div class='mt-line'>{html.escape(text)}</div></div>")


def error_html(message: str | None) -> str:
    if not message:
        return "<div id='mt-error' data-empty='1'></div>"
    return f"<div id='mt-error' role='alert'>⚠ {html.escape(message)}</div>"


def notes_html(notes: list[str]) -> str:
    return "".join(f"<div class='mt-note'>{html.escape(n)}</div>" for n in notes)


HISTORY_HEADERS = ["job", "status", "submitted", "video", "speakers", "prompt"]


def history_rows(jobs) -> list[list]:
    rows = []
    for j in jobs:
        video = f"{j.frames} frames, {j.duration_s:.2f} s" if j.frames else (j.error or "")[:80]
        rows.append([j.id, j.status, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.created_at)), video,
                     j.speakers or "", (j.prompt or "")[:80]])
    return rows or [["", "", "", "", "", ""]]


def safe_history(backend) -> list[list]:
    """The history table, empty when the backend cannot be read (a service that is down)."""
    try:
        return history_rows(backend.history())
    except UserInputError as exc:
        log.warning("history unavailable: %s", exc)
        return history_rows([])


def default_editor(image_path: str | None, two: bool):
    """The box editor's value for a newly given image: the official default left/right boxes."""
    from multitalk.media.image import load_image
    from multitalk.pipeline.speakers import default_boxes
    from multitalk.ui.box_editor import editor_value

    if not image_path:
        return None
    img = load_image(image_path, field="cond_image")
    return editor_value(img, [list(b) for b in default_boxes(img.height, img.width)], show=two)


CSS = """
#mt-error { color: #b42318; background: #fef3f2; border: 1px solid #fda29b; border-radius: 8px; padding: 10px 14px;
            font-weight: 600; }
#mt-error[data-empty] { display: none; }
.mt-bar { height: 10px; background: var(--border-color-primary); border-radius: 5px; overflow: hidden; }
.mt-bar > div { height: 100%; background: var(--color-accent); transition: width .3s; }
.mt-line { margin-top: 6px; font-variant-numeric: tabular-nums; }
.mt-note { color: #93370d; font-size: 90%; }
"""


# ---------------------------------------------------------------------------------------------
# the page


def build_app(backend, *, synthesizer, work_dir: str | Path, defaults: PageDefaults | None = None,
              recipes: list[Recipe] | None = None, voices: list[str] | None = None, loras: list[dict] | None = None):
    """The Gradio Blocks of the page; ``backend`` is a LocalJobs or an ApiJobs; ``loras`` the LoRA
    files (``[{"uri", "scale"}]``) a fast recipe merges."""
    import gradio as gr

    from multitalk.ui.box_editor import make_box_editor

    defaults = defaults or PageDefaults()
    recipes = recipes or available_recipes()
    recipe_by_label = {r.label: r for r in recipes}
    voices = voices or ESPEAK_VOICES
    work_dir = Path(work_dir)

    with gr.Blocks(title="MultiTalk") as app:
        gr.Markdown("## MultiTalk: talking video from an image, speech and a prompt")
        status = gr.Markdown(f"Running on the {backend.describe()}: {backend.status()}", elem_id="mt-status")
        job_state = gr.State(None)

        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                image = gr.Image(label="Reference image", type="filepath", sources=["upload", "clipboard"],
                                 height=180, elem_id="mt-image")
                gr.Markdown("Speaker boxes: drag a box to move it, its corner to resize it, or type the "
                            "pixels (rows and columns of the source image).", elem_id="mt-box-help")
                editor = make_box_editor(elem_id="mt-boxes")
                with gr.Accordion("Box coordinates (source pixels)", open=False, elem_id="mt-box-numbers") as box_acc:
                    numbers = []
                    for p in (1, 2):
                        with gr.Row():
                            for name in BOX_LABELS:
                                numbers.append(gr.Number(label=f"Speaker {p} {name}", precision=0, minimum=0,
                                                         min_width=80, elem_id=f"mt-box{p}-{name}"))
            with gr.Column(scale=1):
                count = gr.Radio(["One speaker", "Two speakers"], value="Two speakers", label="Speakers",
                                 elem_id="mt-count")
                speaker_widgets = []
                for p in (1, 2):
                    with gr.Group(visible=True, elem_id=f"mt-speaker{p}") as group:
                        source = gr.Radio(list(SOURCES), value=SOURCES[0],
                                          label=f"Speaker {p} ({'red, left' if p == 1 else 'blue, right'} box)",
                                          elem_id=f"mt-source{p}")
                        audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Speech",
                                         elem_id=f"mt-audio{p}")
                        with gr.Column(visible=False) as text_col:
                            text = gr.Textbox(label="Text to speak", lines=2, placeholder="What this person says",
                                              elem_id=f"mt-text{p}")
                            with gr.Row(equal_height=True):
                                voice = gr.Dropdown(voices, value=voices[0] if p == 1 else voices[1],
                                                    allow_custom_value=True, label="Voice (espeak-ng name or Kokoro voice)",
                                                    scale=3, elem_id=f"mt-voice{p}")
                                hear = gr.Button("Hear it", scale=1, min_width=90, elem_id=f"mt-hear{p}")
                            heard = gr.Audio(label="Synthesised speech", type="filepath", interactive=False,
                                             elem_id=f"mt-heard{p}")
                    speaker_widgets.append(dict(group=group, source=source, audio=audio, text_col=text_col,
                                                text=text, voice=voice, hear=hear, heard=heard))
                audio_type = gr.Radio(list(AUDIO_TYPES), value=next(iter(AUDIO_TYPES)), label="Two speakers talk",
                                      elem_id="mt-audio-type")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Describe the scene and the people",
                                    elem_id="mt-prompt")
                recipe = gr.Radio([r.label for r in recipes], value=recipes[0].label, label="Recipe",
                                  elem_id="mt-recipe")
                with gr.Row():
                    size = gr.Dropdown(list(SIZES), label="Resolution", elem_id="mt-size",
                                       value=next(k for k, v in SIZES.items() if v == defaults.size))
                    mode = gr.Dropdown(list(MODES), label="Length", elem_id="mt-mode",
                                       value=next(k for k, v in MODES.items() if v == defaults.mode))
                    seed = gr.Number(defaults.seed, label="Seed (-1: random)", precision=0, elem_id="mt-seed")
                with gr.Accordion("Advanced settings", open=False, elem_id="mt-advanced"):
                    with gr.Row():
                        steps = gr.Number(defaults.sample_steps, label="Sampling steps", precision=0, minimum=1,
                                          elem_id="mt-steps")
                        shift = gr.Number(0, label="Flow shift (0: 7 at 480p, 11 at 720p)",
                                          elem_id="mt-shift")
                        text_scale = gr.Number(5.0, label="Text guidance", elem_id="mt-text-scale")
                        audio_scale = gr.Number(4.0, label="Audio guidance", elem_id="mt-audio-scale")
                    with gr.Row():
                        frame_num = gr.Number(defaults.frame_num, label="Frames per clip (4n+1)", precision=0,
                                              elem_id="mt-frame-num")
                        motion_frame = gr.Number(defaults.motion_frame, label="Overlap frames", precision=0,
                                                 elem_id="mt-motion-frame")
                        max_frames = gr.Number(0, label="Stop after N frames (0: whole audio)", precision=0,
                                               elem_id="mt-max-frames")
                    with gr.Row():
                        colour = gr.Slider(0, 1, value=defaults.color_correction_strength, step=0.05,
                                           label="Colour correction", elem_id="mt-colour")
                        teacache = gr.Checkbox(False, label="TeaCache (faster, approximate)", elem_id="mt-teacache")
                        apg = gr.Checkbox(False, label="Adaptive projected guidance", elem_id="mt-apg")
                    n_prompt = gr.Textbox(label="Negative prompt (empty: the official one)", lines=2,
                                          elem_id="mt-n-prompt")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="mt-generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="mt-cancel")
                errors = gr.HTML(error_html(None), elem_id="mt-error-box")
                notes = gr.HTML("", elem_id="mt-notes")
                progress = gr.HTML(progress_html(None), elem_id="mt-progress-box")
            with gr.Column(scale=1):
                video = gr.Video(label="Result", interactive=False, elem_id="mt-video")
                download = gr.File(label="Download", interactive=False, elem_id="mt-download")
        with gr.Accordion("History", open=True, elem_id="mt-history-box"):
            history = gr.Dataframe(value=safe_history(backend), headers=HISTORY_HEADERS,
                                   interactive=False, wrap=True, elem_id="mt-history", max_height=320,
                                   column_widths=["12%", "10%", "16%", "18%", "8%", "36%"])
            refresh = gr.Button("Refresh", size="sm", elem_id="mt-refresh")

        # -- events ------------------------------------------------------------------------------
        def on_image(path, n):
            try:
                value = default_editor(path, n == "Two speakers")
            except UserInputError as exc:
                return [None, *([None] * 8), error_html(str(exc))]
            boxes = (value or {}).get("boxes") or [[None] * 4, [None] * 4]
            return [value, *boxes[0], *boxes[1], error_html(None)]

        image.change(on_image, [image, count], [editor, *numbers, errors])

        def on_count(n, value):
            two = n == "Two speakers"
            if value:
                value = dict(value, show=two)
            return [gr.update(visible=two), gr.update(visible=two), gr.update(visible=two), value]

        count.change(on_count, [count, editor], [speaker_widgets[1]["group"], audio_type, box_acc, editor])

        for w in speaker_widgets:
            w["source"].change(lambda s: [gr.update(visible=s == SOURCES[0]), gr.update(visible=s == SOURCES[1])],
                               w["source"], [w["audio"], w["text_col"]])

        def on_editor(value):
            boxes = (value or {}).get("boxes") or [[None] * 4, [None] * 4]
            return [*boxes[0], *boxes[1]]

        editor.change(on_editor, editor, numbers)

        def on_numbers(value, *vals):
            if not value:
                return value
            boxes = [[_number(v) for v in vals[:4]], [_number(v) for v in vals[4:]]]
            return dict(value, boxes=boxes)

        for num in numbers:
            num.input(on_numbers, [editor, *numbers], editor)

        def on_recipe(label):
            r = recipe_by_label.get(label, recipes[0]).params
            return [r.get("sample_steps", 40), r.get("sample_shift") or 0, r.get("text_guide_scale", 5.0),
                    r.get("audio_guide_scale", 4.0)]

        recipe.change(on_recipe, recipe, [steps, shift, text_scale, audio_scale])

        def make_hear(p):
            def on_hear(text_value, voice_value):
                from multitalk.pipeline.speech_from_text import speak_line

                try:
                    path, warn = speak_line(text_value or "", voice_value or "en-us",
                                            work_dir / "heard" / f"{uuid.uuid4().hex[:10]}-person{p}.wav",
                                            synthesizer, field=f"tts_audio.text (person {p})",
                                            voice_field=f"tts_audio.human{p}_voice")
                except UserInputError as exc:
                    return None, error_html(str(exc)), ""
                return str(path), error_html(None), notes_html(warn)
            return on_hear

        for p, w in enumerate(speaker_widgets, start=1):
            w["hear"].click(make_hear(p), [w["text"], w["voice"]], [w["heard"], errors, notes])

        inputs = [image, count, audio_type, editor, prompt, recipe, size, mode, seed, steps, shift, text_scale,
                  audio_scale, frame_num, motion_frame, max_frames, colour, teacache, apg, n_prompt]
        for w in speaker_widgets:
            inputs += [w["source"], w["audio"], w["text"], w["voice"]]
        outputs = [errors, notes, progress, video, download, history, job_state, status]

        def on_generate(img, n, atype, value, prompt_text, recipe_label, size_label, mode_label, seed_v, steps_v,
                        shift_v, tscale, ascale, fnum, mframe, maxf, colour_v, tea, apg_v, nprompt, *sp):
            two = n == "Two speakers"
            speakers = [{"source": "text" if sp[4 * i] == SOURCES[1] else "audio", "audio": sp[4 * i + 1],
                         "text": sp[4 * i + 2], "voice": sp[4 * i + 3]} for i in range(2)]
            params = {"size": SIZES.get(size_label, size_label), "mode": MODES.get(mode_label, mode_label),
                      "seed": seed_v, "sample_steps": steps_v, "sample_shift": shift_v or None,  # 0: the default
                      "text_guide_scale": tscale, "audio_guide_scale": ascale, "frame_num": fnum,
                      "motion_frame": mframe, "max_frames": maxf or None,
                      "color_correction_strength": colour_v, "use_teacache": bool(tea), "use_apg": bool(apg_v),
                      "n_prompt": nprompt or ""}
            if recipe_label in recipe_by_label and recipe_by_label[recipe_label].lora:
                params["recipe"] = recipe_by_label[recipe_label].key
                params["loras"] = [dict(lora) for lora in loras or []]
            speech_dir = work_dir / "speech" / uuid.uuid4().hex[:10]
            yield {errors: error_html(None), notes: "", progress: progress_html(None), video: None, download: None}
            try:
                spec, opts, warn = build_inputs(image=img, prompt=prompt_text, two=two,
                                                audio_type=AUDIO_TYPES.get(atype, atype),
                                                boxes=(value or {}).get("boxes"), speakers=speakers,
                                                speech_dir=speech_dir, synthesizer=synthesizer, params=params)
                job_id = backend.submit(spec, opts)
            except UserInputError as exc:
                yield {errors: error_html(str(exc))}
                return
            yield {notes: notes_html(warn), job_state: job_id, history: safe_history(backend)}
            while True:
                try:
                    job = backend.get(job_id)
                except UserInputError as exc:   # the service went away
                    yield {errors: error_html(str(exc))}
                    return
                yield {progress: progress_html(job)}
                if job.finished:
                    break
                time.sleep(POLL_S)
            update = {history: safe_history(backend), job_state: None,
                      status: f"Running on the {backend.describe()}: {backend.status()}"}
            if job.status == "succeeded":
                path = str(backend.video_path(job_id))
                update.update({video: path, download: path})
            elif job.status == "failed":
                update[errors] = error_html(job.error or "the job failed")
            yield update

        generate.click(on_generate, inputs, outputs, concurrency_limit=16)

        def on_cancel(job_id):
            if job_id:
                backend.cancel(job_id)

        cancel.click(on_cancel, job_state, None)

        def on_refresh():
            return safe_history(backend), f"Running on the {backend.describe()}: {backend.status()}"

        refresh.click(on_refresh, None, [history, status])
        app.load(on_refresh, None, [history, status])

        def on_select(evt: gr.SelectData):
            row = evt.row_value if evt is not None else None
            if not row or not row[0]:
                return [gr.update(), gr.update(), gr.update(), gr.update()]
            try:
                job = backend.get(row[0])
                path = backend.video_path(row[0])
            except UserInputError as exc:
                return [None, None, error_html(str(exc)), gr.update()]
            path = str(path) if path else None
            return [path, path, error_html(job.error), progress_html(job)]

        history.select(on_select, None, [video, download, errors, progress])
    return app


def serve_page(app, host: str, port: int, *, auth: tuple[str, str] | None = None,
               allowed_paths: list[str] | None = None, prevent_thread_lock: bool = False, quiet: bool = False):
    """Launch the page (no share link, no analytics, no server-side rendering, no MCP)."""
    import gradio as gr

    theme = gr.themes.Soft(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return app.launch(server_name=host, server_port=port, auth=auth, share=False, allowed_paths=allowed_paths,
                      prevent_thread_lock=prevent_thread_lock, quiet=quiet, show_error=False, ssr_mode=False,
                      mcp_server=False, pwa=False, enable_monitoring=False, footer_links=[], theme=theme,
                      css=CSS, max_file_size="500mb")


__all__ = ["PageDefaults", "Recipe", "available_recipes", "lora_recipes", "build_app", "build_inputs", "history_rows",
           "page_defaults", "progress_html", "serve_page"]



def create_page(*, data_dir: str | Path, api: str | None = None, token: str | None = None,
                engine_config=None, tts_dir: str | Path | None = None, preset: str | None = None,
                loras: list[dict] | None = None):
    """``(app, backend)``: the page over the local engine (``engine_config``) or a service (``api``).
    ``loras`` (``[{"uri", "scale"}]``: local files, or URIs the service reads) enable the fast recipes."""
    from multitalk.pipeline.speech_from_text import SpeechSynthesizer

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if api:
        from multitalk.ui.api_client import ApiJobs

        backend = ApiJobs(api, token, cache_dir=data_dir)
    else:
        from multitalk.ui.jobs import LocalJobs

        backend = LocalJobs(engine_config, data_dir)
    voices = list(ESPEAK_VOICES)
    if tts_dir:   # the Kokoro folder's voices first
        voices = sorted(p.stem for p in (Path(tts_dir) / "voices").glob("*.pt")) + voices
    synthesizer = SpeechSynthesizer(tts_dir)
    app = build_app(backend, synthesizer=synthesizer, work_dir=data_dir / "page", defaults=page_defaults(preset),
                    voices=voices, recipes=available_recipes(lora_recipes(loras)), loras=loras)
    return app, backend


__all__ += ["create_page"]
