"""``multitalk`` command line: generate, demo, weights check / make-tiny, serve, worker.

Every option of the official ``generate_multitalk.py`` is accepted with its own name (``--frame_num``)
and the dashed spelling (``--frame-num``), with the same meaning. Bad input prints one line naming
the field and the fix and exits with code 2; ``--debug`` shows the traceback.

``--lora_dir`` and ``--lora_scale`` take several values as the official ``nargs='+'`` options do
(``--lora_dir a.safetensors b.safetensors --lora_scale 1.0 0.5``) and may also be repeated; click has
no ``nargs='+'``, so :func:`expand_multi_value_options` rewrites the first form into the second
before parsing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from multitalk.errors import CheckpointError, MemoryPlanError, MultiTalkError, UserInputError

# options that take one or more values (official argparse nargs='+'): name -> value kind
_MULTI_VALUE = {"--lora_dir": "path", "--lora-dir": "path", "--lora_scale": "number", "--lora-scale": "number"}


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def expand_multi_value_options(args: list[str]) -> list[str]:
    """``--lora_dir a b --lora_scale 1 0.5`` -> ``--lora_dir a --lora_dir b --lora_scale 1 --lora_scale 0.5``.

    After such an option, further tokens are its values while they look like values: numbers for
    ``--lora_scale``; for ``--lora_dir`` anything that is not an option and does not end in
    ``.json`` (so ``--lora_dir a.safetensors example.json`` keeps ``example.json`` as INPUT_JSON).
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        out.append(token)
        i += 1
        if token == "--":
            out.extend(args[i:])
            break
        kind = _MULTI_VALUE.get(token)
        if kind is None or i >= len(args):
            continue
        out.append(args[i])  # the option's own value, whatever it looks like
        i += 1
        while i < len(args):
            nxt = args[i]
            more = _is_number(nxt) if kind == "number" else not (nxt.startswith("-") or nxt.lower().endswith(".json"))
            if not more:
                break
            out += [token, nxt]
            i += 1
    return out


class _Group(TyperGroup):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, expand_multi_value_options(list(args)))


# Plain click help (rich_markup_mode=None): the rich option table cuts long option names at 80
# columns, and the official spellings (--sample_text_guide_scale, ...) must stay readable.
app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="MultiTalk: lip-synced talking video from an image, speech and a prompt.")
weights_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Inspect or create model weight folders.")
app.add_typer(weights_app, name="weights")
# markup off: messages carry user text (file names like photo[draft].png, bbox hints) printed as is
err = Console(stderr=True, markup=False, highlight=False)
out = Console(markup=False, highlight=False)

_DEBUG = False


def _say(console: Console, text: str, label: str | None = None, style: str = "") -> None:
    """One message, ``text`` printed literally after an optional styled ``label``."""
    console.print(Text.assemble((f"{label} ", style), text) if label else Text(text), soft_wrap=True)


def _fail(exc: BaseException, code: int = 2) -> None:
    if _DEBUG:
        raise exc
    _say(err, str(exc), "error:", "bold red")
    raise typer.Exit(code)


def _run_guarded(fn):
    try:
        return fn()
    except typer.Exit:
        raise
    except (UserInputError, CheckpointError, MemoryPlanError) as exc:
        _fail(exc, 2)
    except MultiTalkError as exc:
        _fail(exc, 1)
    except KeyboardInterrupt:
        _say(err, "interrupted")
        raise typer.Exit(130)
    except Exception as exc:  # anything unexpected: one line, the hint, no traceback
        if _DEBUG:
            raise
        _say(err, f"{type(exc).__name__}: {exc} (run again with --debug for the traceback)", "error:", "bold red")
        raise typer.Exit(1)


def _opt(default, *names, help: str = "", **kw):
    return typer.Option(default, *names, help=help, **kw)


def _given(ctx: typer.Context | None, name: str) -> bool:
    """Whether the option ``name`` was given on the command line (not its default)."""
    if ctx is None:
        return True
    source = ctx.get_parameter_source(name)  # by name: typer may carry its own copy of click's enum
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def lora_specs(lora_dir: list | None, lora_scale: list | None) -> tuple:
    """``--lora_dir`` / ``--lora_scale`` -> LoRA specs (one scale per file, 1.0 each by default)."""
    from multitalk.models.lora import LoraSpec, check_scale

    files = list(lora_dir or [])
    scales = list(lora_scale or [])
    if scales and not files:
        raise UserInputError("lora_scale", "given without --lora_dir", "add --lora_dir FILE [FILE ...]")
    if scales and len(scales) != len(files):
        raise UserInputError("lora_scale", f"{len(scales)} scales for {len(files)} LoRA files",
                             "give one --lora_scale per --lora_dir file, or none (1.0 each)")
    scales = scales or [1.0] * len(files)
    return tuple(LoraSpec(Path(f), check_scale(s, i)) for i, (f, s) in enumerate(zip(files, scales)))


# recipe field -> the generate() parameter that sets it
_RECIPE_OPTIONS = {"sample_steps": "sample_steps", "sample_shift": "sample_shift", "text_guide_scale": "text_scale",
                   "audio_guide_scale": "audio_scale"}
RECIPE_FILES = {"lightx2v": "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors",
                "fusionx": "Wan2.1_I2V_14B_FusionX_LoRA.safetensors"}


@app.command()
def generate(
    ctx: typer.Context,
    input_json: Optional[Path] = typer.Argument(None, help="Official input JSON (prompt, cond_image, cond_audio, audio_type, bbox)."),
    input_json_opt: Optional[Path] = _opt(None, "--input_json", "--input-json", help="Same as the positional INPUT_JSON."),
    image: Optional[Path] = _opt(None, "--image", help="Reference image (instead of a JSON)."),
    audio: Optional[Path] = _opt(None, "--audio", help="Speech of person 1 (instead of a JSON)."),
    audio2: Optional[Path] = _opt(None, "--audio2", help="Speech of person 2 (two-person video)."),
    prompt: Optional[str] = _opt(None, "--prompt", help="Text prompt (instead of a JSON)."),
    audio_type: str = _opt("add", "--audio_type", "--audio-type", help="Two speakers: add (one after the other) or para (together)."),
    text: Optional[str] = _opt(None, "--text", help="Speech from text instead of --audio: '(s1) hello (s2) hi there' (tags for two speakers)."),
    voice1: Optional[str] = _opt(None, "--human1_voice", "--human1-voice", "--voice1", help="Voice of person 1 for --text: espeak-ng name (en-us, en-gb+f3) or Kokoro voice (af_heart, .../voices/af_heart.pt)."),
    voice2: Optional[str] = _opt(None, "--human2_voice", "--human2-voice", "--voice2", help="Voice of person 2 for --text (default en-us+f3 when the text has (s2) lines)."),
    audio_mode: Optional[str] = _opt(None, "--audio_mode", "--audio-mode", help="localfile (cond_audio files) or tts (speak tts_audio); default: tts when the JSON has tts_audio and no cond_audio."),
    tts_dir: Optional[Path] = _opt(None, "--tts_dir", "--tts-dir", help="Kokoro-82M folder, for Kokoro voices (default: espeak-ng, offline)."),
    audio_save_dir: Optional[Path] = _opt(None, "--audio_save_dir", "--audio-save-dir", help="Where synthesised speech is written (default: <out>_speech/ next to the video)."),
    out_path: Optional[Path] = _opt(None, "--out", "-o", help="Output mp4 (default outputs/<input name>.mp4)."),
    save_file: Optional[str] = _opt(None, "--save_file", "--save-file", help="Official spelling: output name; .mp4 is appended if missing."),
    ckpt_dir: Optional[Path] = _opt(None, "--ckpt_dir", "--ckpt-dir", help="Wan2.1-I2V-14B-480P folder."),
    multitalk_dir: Optional[Path] = _opt(None, "--multitalk_dir", "--multitalk-dir", help="MeiGen-MultiTalk folder (if multitalk.safetensors was not copied into --ckpt-dir)."),
    wav2vec_dir: Optional[Path] = _opt(None, "--wav2vec_dir", "--wav2vec-dir", help="chinese-wav2vec2-base folder."),
    preset: Optional[str] = _opt(None, "--preset", help="'tiny': the project's small random weights (demo/testing)."),
    size: str = _opt("multitalk-480", "--size", help="multitalk-480 or multitalk-720 (aspect-ratio buckets); preview: quarter-size, for quick CPU runs."),
    frame_num: int = _opt(81, "--frame_num", "--frame-num", help="Frames per clip, 4n+1."),
    motion_frame: int = _opt(25, "--motion_frame", "--motion-frame", help="Frames of overlap between clips (streaming)."),
    mode: str = _opt("clip", "--mode", help="clip (one clip) or streaming (until the audio ends)."),
    sample_steps: int = _opt(40, "--sample_steps", "--sample-steps", help="Sampling steps."),
    sample_shift: Optional[float] = _opt(None, "--sample_shift", "--sample-shift", help="Flow shift (default 7 at 480p, 11 at 720p)."),
    text_scale: float = _opt(5.0, "--sample_text_guide_scale", "--sample-text-guide-scale", help="Text guidance scale (1.0: 2 passes per step instead of 3)."),
    audio_scale: float = _opt(4.0, "--sample_audio_guide_scale", "--sample-audio-guide-scale", help="Audio guidance scale (with text guide 1.0 too: 1 pass per step)."),
    lora_dir: Optional[list[Path]] = _opt(None, "--lora_dir", "--lora-dir", help="LoRA .safetensors file(s), merged into the DiT at load, in order: --lora_dir A [B ...] (official, kohya or diffusers format)."),
    lora_scale: Optional[list[float]] = _opt(None, "--lora_scale", "--lora-scale", help="Strength per --lora_dir file: --lora_scale 1.0 [0.5 ...] (default 1.0 each)."),
    recipe: Optional[str] = _opt(None, "--recipe", help="Few-step defaults for a step-distillation LoRA: lightx2v (4 steps) or fusionx (8 steps); shift 2, text guide 1, audio guide 2. Options given explicitly win."),
    seed: int = _opt(42, "--base_seed", "--base-seed", "--seed", help="Random seed (same noise as the official code on the same device)."),
    n_prompt: str = _opt("", "--n_prompt", "--n-prompt", help="Negative prompt (default: the official one)."),
    use_teacache: bool = _opt(False, "--use_teacache", "--use-teacache", help="Skip DiT calls with TeaCache."),
    teacache_thresh: float = _opt(0.2, "--teacache_thresh", "--teacache-thresh", help="TeaCache threshold."),
    use_apg: bool = _opt(False, "--use_apg", "--use-apg", help="Adaptive projected guidance."),
    apg_momentum: float = _opt(-0.75, "--apg_momentum", "--apg-momentum", help="APG momentum."),
    apg_norm_threshold: float = _opt(55.0, "--apg_norm_threshold", "--apg-norm-threshold", help="APG norm threshold."),
    color_correction_strength: float = _opt(1.0, "--color_correction_strength", "--color-correction-strength", help="0..1 colour correction toward the reference image."),
    max_frames: Optional[int] = _opt(None, "--max-frames", "--max_frames", help="Streaming: stop after N frames."),
    device: str = _opt("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    dtype: str = _opt("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32 (float32 everywhere, no TF32)."),
    vae_dtype: str = _opt("auto", "--vae-dtype", "--vae_dtype", help="VAE dtype: auto (the same as --dtype), bfloat16, float32."),
    noise_device: str = _opt("engine", "--noise-device", "--noise_device", help="Where the seeded noise is drawn: engine (the official: per device) or cpu (the same video on any device)."),
    offload: bool = _opt(False, "--offload_model", "--offload-model", "--offload", help="Encoders and VAE leave the GPU between uses."),
    fp8: bool = _opt(False, "--fp8", help="FP8 compute: the DiT's feed-forward linears in e4m3 (Ada/Hopper matmuls)."),
    weights: str = _opt("auto", "--weights", help="DiT block weights: auto/bf16 (the compute dtype) or fp8 (e4m3, half the memory)."),
    fp8_matmul: Optional[bool] = _opt(None, "--fp8-matmul/--no-fp8-matmul", help="fp8 weights through fp8 matmuls (default: where the GPU has them); off: dequantised per layer."),
    max_vram: Optional[float] = _opt(None, "--max-vram", "--max_vram", help="GPU memory to plan for, in GiB (default: what the GPU has free)."),
    persistent_params: Optional[int] = _opt(None, "--num_persistent_param_in_dit", "--num-persistent-param-in-dit", help="Official: DiT parameters kept on the GPU; the other blocks are streamed (0: all)."),
    attention: str = _opt("auto", "--attention", help="DiT self-attention: sdpa (bf16), int8 (8-bit Triton kernel, Hopper) or auto (int8 on Hopper in bf16)."),
    compile: Optional[bool] = _opt(None, "--compile/--no-compile", help="Regional torch.compile of the DiT blocks and fused VAE element-wise kernels (default: on for CUDA)."),
    gpus: Optional[int] = _opt(None, "--gpus", help="Processes (one GPU each) for the DiT: starts them itself; under torchrun, its WORLD_SIZE."),
    parallel: str = _opt("auto", "--parallel", help="With --gpus > 1: auto, ulysses (split the sequence) or cfg (guidance branches side by side)."),
    save_tensor: Optional[Path] = _opt(None, "--save-tensor", "--save_tensor", help="Also store the float video as safetensors key 'video' (3,T,H,W)."),
    quiet: bool = _opt(False, "--quiet", "-q", help="No progress bars."),
    debug: bool = _opt(False, "--debug", help="Show tracebacks."),
):
    """Generate a talking video (mp4 with sound)."""
    global _DEBUG
    _DEBUG = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)

    def run():
        from multitalk.pipeline.engine import Engine, EngineConfig
        from multitalk.pipeline.inputs import GenerationParams, InputSpec, load_input_json
        from multitalk.pipeline.render import render
        from multitalk.runtime.parallel.group import under_torchrun
        from multitalk.ui.terminal import ProgressView

        _check_attention(attention)
        if gpus is not None and gpus < 1:
            raise UserInputError("gpus", f"--gpus {gpus}", "use --gpus 1 or more")
        loras = lora_specs(lora_dir, lora_scale)
        config = EngineConfig(ckpt_dir=ckpt_dir, wav2vec_dir=wav2vec_dir, multitalk_dir=multitalk_dir,
                              preset=preset, device=device, dtype=dtype, vae_dtype=vae_dtype, offload=offload,
                              fp8=fp8, compile=compile, attention=attention, loras=loras, weights=weights,
                              fp8_matmul=fp8_matmul, max_vram_gib=max_vram,
                              num_persistent_param_in_dit=persistent_params, gpus=gpus or 1, parallel=parallel)
        if under_torchrun() and int(os.environ["RANK"]) != 0:
            from multitalk.pipeline.parallel import serve_from_env

            serve_from_env(config)      # rank 0 alone reads the inputs and writes the video
            return
        json_path = input_json or input_json_opt
        if audio_mode not in (None, "localfile", "tts"):
            raise UserInputError("audio_mode", f"unknown audio mode {audio_mode!r}",
                                 "use localfile (cond_audio files) or tts (speech from tts_audio / --text)")
        if json_path is not None:
            spec, warnings = load_input_json(json_path)
            for w in warnings:
                _say(err, w, "warning:", "yellow")
            if audio_mode == "tts":
                if spec.tts_audio is None:
                    raise UserInputError("tts_audio", "missing (--audio_mode tts)",
                                         "add tts_audio {text, human1_voice[, human2_voice]} to the JSON")
                spec = spec.model_copy(update={"cond_audio": None})
            elif audio_mode == "localfile" and spec.cond_audio is None:
                raise UserInputError("cond_audio", "missing (--audio_mode localfile)",
                                     "give cond_audio files, or use --audio_mode tts to speak tts_audio")
        else:
            if image is None or (audio is None and text is None):
                raise UserInputError("input_json", "no input given",
                                     "pass INPUT_JSON, or --image and --audio [--audio2] (or --text) [--prompt]")
            if text is not None and (audio is not None or audio2 is not None):
                raise UserInputError("text", "given together with --audio", "give either audio files or --text")
            data = {"prompt": prompt or "", "cond_image": str(image), "audio_type": audio_type}
            if text is not None:
                tts = {"text": text, "human2_voice": voice2}
                if voice1 is not None:
                    tts["human1_voice"] = voice1
                data["tts_audio"] = tts
            else:
                data["cond_audio"] = {"person1": str(audio)}
                if audio2 is not None:
                    data["cond_audio"]["person2"] = str(audio2)
            spec = InputSpec.from_dict(data)
        options = dict(sample_steps=sample_steps, sample_shift=sample_shift, text_guide_scale=text_scale,
                       audio_guide_scale=audio_scale)
        if recipe is not None:  # the recipe's values for what the command line left at its defaults
            options = {k: v for k, v in options.items() if _given(ctx, _RECIPE_OPTIONS[k])}
        params = GenerationParams.from_cli(
            size=size, frame_num=frame_num, motion_frame=motion_frame, mode=mode, seed=seed, recipe=recipe,
            n_prompt=n_prompt, use_teacache=use_teacache, teacache_thresh=teacache_thresh, use_apg=use_apg,
            apg_momentum=apg_momentum, apg_norm_threshold=apg_norm_threshold,
            color_correction_strength=color_correction_strength, max_frames=max_frames,
            noise_device=noise_device, **options)
        if params.recipe is not None and not loras:
            _say(err, f"--recipe {params.recipe} without --lora_dir: {params.sample_steps} steps of the base model "
                      f"give a blurred video (the recipe is made for {RECIPE_FILES[params.recipe]})",
                 "warning:", "yellow")
        stem = json_path.stem if json_path is not None else "multitalk"
        if out_path is not None:
            field, target = "out", out_path
        elif save_file is not None:
            field, target = "save_file", Path(save_file)
        else:
            field, target = "out", Path("outputs") / f"{stem}.mp4"
        if preset is None and ckpt_dir is None:
            raise UserInputError("ckpt_dir", "no model weights given",
                                 "pass --ckpt-dir and --wav2vec-dir (official folders), or --preset tiny")
        from multitalk.pipeline.generate import prepare_media
        from multitalk.pipeline.render import check_output_path

        config.check()  # folders, device, dtypes and attention: before anything is decoded or loaded
        target = check_output_path(target, field=field, stem=stem)
        if save_tensor is not None:
            check_output_path(save_tensor, field="save_tensor", suffix=None)
        if spec.uses_tts:
            from multitalk.pipeline.speech_from_text import SpeechSynthesizer, speak_inputs

            speech_dir = audio_save_dir or target.with_name(f"{target.stem}_speech")
            with err.status("synthesising speech ..."):
                spec, notes = speak_inputs(spec, speech_dir, SpeechSynthesizer(tts_dir))
            for w in notes:
                _say(err, w, "warning:", "yellow")
            _say(err, f"speech synthesised into {speech_dir}")
        media = prepare_media(spec, params)  # every input problem surfaces before models load
        from multitalk.pipeline.memory import workload_of

        config = replace(config, workload=workload_of(media, params))
        t0 = time.perf_counter()
        with err.status("loading models ..."):
            engine = Engine.load(config)
        try:
            where = (f"{engine.device} + {engine.parallel.world - 1} more processes, --parallel {parallel}"
                     if engine.parallel is not None else f"{engine.device}")
            _say(err, f"models loaded in {time.perf_counter() - t0:.1f}s ({engine.arch.name}, {where}, "
                      f"{engine.dtype}, {engine.attention} attention)")
            if engine.plan is not None:
                _say(err, engine.plan.summary())
            for line in engine.lora_report.lines():
                _say(err, line)
            from multitalk.pipeline.guidance import branch_names

            passes = len(branch_names(params.text_guide_scale, params.audio_guide_scale))
            _say(err, f"sampling: {params.sample_steps} steps x {passes} model passes per clip (shift {params.shift:g}, "
                      f"text guide {params.text_guide_scale:g}, audio guide {params.audio_guide_scale:g})")
            with ProgressView(console=err, enabled=not quiet) as view:
                result = render(engine, spec, params, target, save_tensor=save_tensor, media=media,
                                progress=view.update)
        finally:
            engine.close()
        _say(out, f"wrote {target} ({result.frames} frames, {result.width}x{result.height}, "
                  f"{result.duration_s:.2f}s, seed {result.seed}) in {time.perf_counter() - t0:.1f}s")

    _run_guarded(run)


@app.command()
def demo(
    out_path: Path = _opt(Path("outputs/demo.mp4"), "--out", "-o", help="Output mp4."),
    workdir: Path = _opt(Path("outputs/demo-inputs"), "--inputs-dir", help="Where the authored demo inputs are written."),
    steps: int = _opt(4, "--sample-steps", "--sample_steps", help="Sampling steps (small for a quick CPU demo)."),
    frame_num: int = _opt(33, "--frame-num", "--frame_num", help="Frames per clip."),
    motion_frame: int = _opt(5, "--motion-frame", "--motion_frame", help="Overlap between clips."),
    size: str = _opt("preview", "--size", help="Bucket table; preview (quarter of 480p) keeps the CPU demo to minutes."),
    debug: bool = _opt(False, "--debug", help="Show tracebacks."),
):
    """Two-speaker demo on the tiny preset (CPU, a few minutes): authored inputs -> outputs/demo.mp4."""
    global _DEBUG
    _DEBUG = debug

    def run():
        from multitalk.pipeline.demo_inputs import write_demo_inputs

        json_path = write_demo_inputs(workdir)
        _say(err, f"demo inputs written to {json_path.parent}")
        generate(ctx=None, input_json=json_path, input_json_opt=None, image=None, audio=None, audio2=None, prompt=None,
                 audio_type="add", text=None, voice1=None, voice2=None, audio_mode=None, tts_dir=None,
                 audio_save_dir=None, out_path=out_path, save_file=None, ckpt_dir=None, multitalk_dir=None,
                 wav2vec_dir=None, preset="tiny", size=size, frame_num=frame_num,
                 motion_frame=motion_frame, mode="streaming", sample_steps=steps, sample_shift=None,
                 text_scale=5.0, audio_scale=4.0, seed=42, n_prompt="", use_teacache=False, teacache_thresh=0.2,
                 use_apg=False, apg_momentum=-0.75, apg_norm_threshold=55.0, color_correction_strength=0.0,
                 max_frames=None, device="cpu", dtype="float32", vae_dtype="auto", noise_device="engine",
                 offload=False, fp8=False, attention="sdpa", compile=False, weights="auto", fp8_matmul=None,
                 max_vram=None, persistent_params=None, save_tensor=None, quiet=False, debug=debug, lora_dir=None,
                 lora_scale=None, recipe=None, gpus=None, parallel="auto")

    _run_guarded(run)


@weights_app.command("check")
def weights_check(
    dirs: list[Path] = typer.Argument(..., help="Model folders: Wan2.1-I2V-14B-480P, MeiGen-MultiTalk, chinese-wav2vec2-base (any order)."),
    debug: bool = _opt(False, "--debug", help="Show tracebacks."),
):
    """Check every component's keys and shapes; non-zero exit on any problem."""
    global _DEBUG
    _DEBUG = debug

    def run():
        from multitalk.models.weights_check import check_folders

        reports = check_folders(dirs)
        bad = False
        for rep in reports:
            _say(out, rep.summary(), *(("ok", "green") if rep.ok else ("PROBLEM", "red")))
            for f in rep.missing_files:
                _say(out, f"    missing file: {f}")
            for k in rep.missing[:10]:
                _say(out, f"    missing key: {k}")
            for k in rep.unexpected[:10]:
                _say(out, f"    unexpected key: {k}")
            for k, exp, got, f in rep.mismatched[:10]:
                _say(out, f"    shape mismatch: {k} expected {exp} got {got} in {f}")
            bad |= not rep.ok
        if bad:
            raise typer.Exit(1)

    _run_guarded(run)


@weights_app.command("make-tiny")
def weights_make_tiny(
    out_dir: Path = typer.Argument(..., help="Folder to write Wan2.1-I2V-tiny/ and chinese-wav2vec2-tiny/ into."),
    seed: int = _opt(0, "--seed", help="Seed of the random weights."),
    force: bool = _opt(False, "--force", help="Rewrite even if an up-to-date copy exists."),
):
    """Write the tiny random-weight folders (official layout, deterministic)."""
    def run():
        from multitalk.models.tiny import write_tiny_checkpoints

        ckpt, w2v = write_tiny_checkpoints(out_dir, seed=seed, force=force)
        _say(out, f"wrote {ckpt} and {w2v}")

    _run_guarded(run)


def _check_attention(attention: str) -> None:
    """An unknown ``--attention`` is a one-line error before anything loads (the device check is Engine.load's)."""
    from multitalk.runtime.attention_int8 import MODES_CLI

    if attention not in MODES_CLI:
        raise UserInputError("attention", f"unknown attention {attention!r}", f"use one of {', '.join(MODES_CLI)}")


def _runner_options(preset, ckpt_dir, wav2vec_dir, multitalk_dir, device, dtype, attention="auto",
                    memory: dict | None = None, tts_dir=None) -> dict:
    if preset is None and ckpt_dir is None:
        raise UserInputError("ckpt_dir", "no model weights given",
                             "pass --ckpt-dir and --wav2vec-dir (official folders), or --preset tiny")
    _check_attention(attention)
    opts = {"preset": preset, "device": device, "dtype": dtype, "attention": attention}
    opts.update({k: v for k, v in (memory or {}).items() if v is not None and v is not False})
    for key, value in (("ckpt_dir", ckpt_dir), ("wav2vec_dir", wav2vec_dir), ("multitalk_dir", multitalk_dir),
                       ("tts_dir", tts_dir)):
        if value is not None:
            opts[key] = str(value)
    return opts


@app.command()
def serve(
    host: str = _opt("127.0.0.1", "--host", help="Bind address (non-loopback needs MULTITALK_API_TOKENS)."),
    port: int = _opt(8000, "--port", help="TCP port."),
    data_dir: Optional[Path] = _opt(None, "--data-dir", help="Uploads, outputs and the SQLite job store (default: MULTITALK_DATA_DIR or multitalk-data)."),
    db: Optional[str] = _opt(None, "--db", help="Job store: postgresql://user:pass@host/db to share one queue between machines (default: MULTITALK_DB or SQLite in --data-dir)."),
    preset: Optional[str] = _opt(None, "--preset", help="'tiny' for the project's small random weights."),
    ckpt_dir: Optional[Path] = _opt(None, "--ckpt_dir", "--ckpt-dir", help="Wan2.1-I2V-14B-480P folder."),
    multitalk_dir: Optional[Path] = _opt(None, "--multitalk_dir", "--multitalk-dir", help="MeiGen-MultiTalk folder."),
    wav2vec_dir: Optional[Path] = _opt(None, "--wav2vec_dir", "--wav2vec-dir", help="chinese-wav2vec2-base folder."),
    device: str = _opt("auto", "--device", help="auto, cpu, cuda ..."),
    dtype: str = _opt("auto", "--dtype", help="auto, bfloat16, float32."),
    max_vram: Optional[float] = _opt(None, "--max-vram", "--max_vram", help="GPU memory to plan for, in GiB (default: what the GPU has free)."),
    weights: str = _opt("auto", "--weights", help="DiT block weights: auto/bf16 or fp8 (e4m3, half the memory)."),
    persistent_params: Optional[int] = _opt(None, "--num_persistent_param_in_dit", "--num-persistent-param-in-dit", help="Official: DiT parameters kept on the GPU; the other blocks are streamed (0: all)."),
    offload: bool = _opt(False, "--offload_model", "--offload-model", help="Encoders and VAE leave the GPU between uses."),
    fp8: bool = _opt(False, "--fp8", help="FP8 compute: the DiT's feed-forward linears in e4m3."),
    attention: str = _opt("auto", "--attention", help="DiT self-attention: sdpa, int8 (Hopper) or auto."),
    tts_dir: Optional[Path] = _opt(None, "--tts_dir", "--tts-dir", help="Kokoro-82M folder for tts_audio jobs with Kokoro voices (default: espeak-ng)."),
    debug: bool = _opt(False, "--debug", help="Show tracebacks."),
):
    """HTTP job API with one in-process worker (models loaded once)."""
    global _DEBUG
    _DEBUG = debug

    def run():
        from multitalk.service.cli_commands import serve as serve_api

        opts = _runner_options(preset, ckpt_dir, wav2vec_dir, multitalk_dir, device, dtype, attention,
                               dict(max_vram_gib=max_vram, weights=None if weights == "auto" else weights,
                                    num_persistent_param_in_dit=persistent_params, offload=offload, fp8=fp8), tts_dir)
        serve_api(host=host, port=port, data_dir=data_dir, runner_options=opts, db=db)

    _run_guarded(run)


@app.command()
def worker(
    data_dir: Optional[Path] = _opt(None, "--data-dir", help="The same data dir as the server's (default: MULTITALK_DATA_DIR or multitalk-data)."),
    db: Optional[str] = _opt(None, "--db", help="The server's job store: postgresql://... (default: MULTITALK_DB or SQLite in --data-dir)."),
    preset: Optional[str] = _opt(None, "--preset", help="'tiny' for the project's small random weights."),
    ckpt_dir: Optional[Path] = _opt(None, "--ckpt_dir", "--ckpt-dir", help="Wan2.1-I2V-14B-480P folder."),
    multitalk_dir: Optional[Path] = _opt(None, "--multitalk_dir", "--multitalk-dir", help="MeiGen-MultiTalk folder."),
    wav2vec_dir: Optional[Path] = _opt(None, "--wav2vec_dir", "--wav2vec-dir", help="chinese-wav2vec2-base folder."),
    device: str = _opt("auto", "--device", help="auto, cpu, cuda ..."),
    dtype: str = _opt("auto", "--dtype", help="auto, bfloat16, float32."),
    max_vram: Optional[float] = _opt(None, "--max-vram", "--max_vram", help="GPU memory to plan for, in GiB (default: what the GPU has free)."),
    weights: str = _opt("auto", "--weights", help="DiT block weights: auto/bf16 or fp8 (e4m3, half the memory)."),
    persistent_params: Optional[int] = _opt(None, "--num_persistent_param_in_dit", "--num-persistent-param-in-dit", help="Official: DiT parameters kept on the GPU; the other blocks are streamed (0: all)."),
    offload: bool = _opt(False, "--offload_model", "--offload-model", help="Encoders and VAE leave the GPU between uses."),
    fp8: bool = _opt(False, "--fp8", help="FP8 compute: the DiT's feed-forward linears in e4m3."),
    max_jobs: Optional[int] = _opt(None, "--max-jobs", help="Exit after N jobs."),
    attention: str = _opt("auto", "--attention", help="DiT self-attention: sdpa, int8 (Hopper) or auto."),
    tts_dir: Optional[Path] = _opt(None, "--tts_dir", "--tts-dir", help="Kokoro-82M folder for tts_audio jobs with Kokoro voices (default: espeak-ng)."),
    gpus: int = _opt(1, "--gpus", help="GPUs this worker owns: one process each, one job at a time over all of them."),
    parallel: str = _opt("auto", "--parallel", help="With --gpus > 1: auto, ulysses or cfg (see multitalk generate)."),
    debug: bool = _opt(False, "--debug", help="Show tracebacks."),
):
    """An extra worker process against the server's job store."""
    global _DEBUG
    _DEBUG = debug

    def run():
        from multitalk.service.cli_commands import worker as run_worker

        if gpus < 1:
            raise UserInputError("gpus", f"--gpus {gpus}", "use --gpus 1 or more")
        opts = _runner_options(preset, ckpt_dir, wav2vec_dir, multitalk_dir, device, dtype, attention,
                               dict(max_vram_gib=max_vram, weights=None if weights == "auto" else weights,
                                    num_persistent_param_in_dit=persistent_params, offload=offload, fp8=fp8), tts_dir)
        if gpus > 1:
            opts.update(gpus=gpus, parallel=parallel)
        n = run_worker(data_dir=data_dir, runner_options=opts, max_jobs=max_jobs, db=db)
        _say(out, f"worker processed {n} jobs")

    _run_guarded(run)


@app.command()
def ui(
    host: str = _opt("127.0.0.1", "--host", help="Bind address (anything but loopback needs --auth)."),
    port: int = _opt(7860, "--port", help="TCP port of the page."),
    preset: Optional[str] = _opt(None, "--preset", help="'tiny': the project's small random weights (quick CPU try-out)."),
    ckpt_dir: Optional[Path] = _opt(None, "--ckpt_dir", "--ckpt-dir", help="Wan2.1-I2V-14B-480P folder."),
    multitalk_dir: Optional[Path] = _opt(None, "--multitalk_dir", "--multitalk-dir", help="MeiGen-MultiTalk folder."),
    wav2vec_dir: Optional[Path] = _opt(None, "--wav2vec_dir", "--wav2vec-dir", help="chinese-wav2vec2-base folder."),
    device: str = _opt("auto", "--device", help="auto, cpu, cuda ..."),
    dtype: str = _opt("auto", "--dtype", help="auto, bfloat16, float32."),
    attention: str = _opt("auto", "--attention", help="DiT self-attention of the local engine: sdpa, int8 (Hopper) or auto."),
    api: Optional[str] = _opt(None, "--api", help="Drive a running `multitalk serve` at this URL instead of a local engine."),
    token: Optional[str] = _opt(None, "--token", envvar="MULTITALK_API_TOKEN", help="API token of the service (--api)."),
    tts_dir: Optional[Path] = _opt(None, "--tts_dir", "--tts-dir", help="Kokoro-82M folder: Kokoro voices for text to speak (default: espeak-ng)."),
    lora_dir: Optional[list[str]] = _opt(None, "--lora_dir", "--lora-dir", help="LoRA file(s) for the fast recipes (lightx2v, fusionx): local files, or with --api URIs the service reads. The quality recipe runs without them."),
    lora_scale: Optional[list[float]] = _opt(None, "--lora_scale", "--lora-scale", help="Strength per --lora_dir file (default 1.0 each)."),
    data_dir: Path = _opt(Path("multitalk-ui"), "--data-dir", help="Job history, videos and synthesised speech of the page."),
    auth: Optional[str] = _opt(None, "--auth", envvar="MULTITALK_UI_AUTH", help="USER:PASSWORD login for the page (required off loopback)."),
    debug: bool = _opt(False, "--debug", help="Show tracebacks."),
):
    """Web page (Gradio): image, speaker boxes, speech or text, progress, video, history."""
    global _DEBUG
    _DEBUG = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)

    def run():
        from multitalk.hosts import is_loopback
        from multitalk.ui.web import create_page, serve_page

        try:
            import gradio  # noqa: F401
        except ImportError:
            raise UserInputError("ui", "the web page needs Gradio, which is not installed",
                                 "pip install -c constraints.txt 'multitalk[ui]'") from None
        login = None
        if auth:
            user, sep, password = auth.partition(":")
            if not sep or not user or not password:
                raise UserInputError("auth", "expected USER:PASSWORD", "e.g. --auth alice:a-long-password")
            login = (user, password)
        if login is None and not is_loopback(host):
            raise UserInputError("host", f"refusing to serve the page on {host} without a login",
                                 "pass --auth USER:PASSWORD (or MULTITALK_UI_AUTH), or use --host 127.0.0.1")
        config = None
        if api is None:
            from multitalk.pipeline.engine import EngineConfig

            if preset is None and ckpt_dir is None:
                raise UserInputError("ckpt_dir", "no model weights given",
                                     "pass --ckpt-dir and --wav2vec-dir (official folders), --preset tiny, "
                                     "or --api URL of a running multitalk serve")
            _check_attention(attention)
            config = EngineConfig(ckpt_dir=ckpt_dir, wav2vec_dir=wav2vec_dir, multitalk_dir=multitalk_dir,
                                  preset=preset, device=device, dtype=dtype, attention=attention)
            config.resolved_dirs()   # missing folders fail now, not on the first job
        loras = None
        if lora_dir:
            if api is None:   # local files: checked against the model now (headers only)
                specs = lora_specs(lora_dir, lora_scale)
                config.check_loras(specs)
                loras = [{"uri": str(spec.path), "scale": spec.scale} for spec in specs]
            else:             # URIs the service reads and checks at submission
                scales = list(lora_scale or [1.0] * len(lora_dir))
                if len(scales) != len(lora_dir):
                    raise UserInputError("lora_scale", f"{len(scales)} scales for {len(lora_dir)} LoRA files",
                                         "give one --lora_scale per --lora_dir file, or none (1.0 each)")
                loras = [{"uri": uri, "scale": scale} for uri, scale in zip(lora_dir, scales)]
        elif lora_scale:
            raise UserInputError("lora_scale", "given without --lora_dir", "add --lora_dir FILE [FILE ...]")
        page, _backend = create_page(data_dir=data_dir, api=api, token=token, engine_config=config,
                                     tts_dir=tts_dir, preset=preset, loras=loras)
        out.print(f"MultiTalk page on http://{host}:{port} ({'service ' + api if api else 'local engine'})")
        serve_page(page, host, port, auth=login, allowed_paths=[str(data_dir.resolve())])

    _run_guarded(run)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
