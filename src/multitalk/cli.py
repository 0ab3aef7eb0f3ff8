"""``multitalk`` command line: generate, demo, weights check / make-tiny, serve, worker.

Every option of the official ``generate_multitalk.py`` is accepted with its own name (``--frame_num``)
and the dashed spelling (``--frame-num``), with the same meaning. Bad input prints one line naming
the field and the fix and exits with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from multitalk.errors import CheckpointError, MultiTalkError, UserInputError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="MultiTalk: lip-synced talking video from an image, speech and a prompt.")
weights_app = typer.Typer(no_args_is_help=True, help="Inspect or create model weight folders.")
app.add_typer(weights_app, name="weights")
err = Console(stderr=True)
out = Console()

_DEBUG = False


def _fail(exc: BaseException, code: int = 2) -> None:
    if _DEBUG:
        raise exc
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _run_guarded(fn):
    try:
        return fn()
    except typer.Exit:
        raise
    except (UserInputError, CheckpointError) as exc:
        _fail(exc, 2)
    except MultiTalkError as exc:
        _fail(exc, 1)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130)
    except Exception as exc:  # anything unexpected: one line, the hint, no traceback
        if _DEBUG:
            raise
        err.print(f"[bold red]error:[/] {type(exc).__name__}: {escape(str(exc))} (run again with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _opt(default, *names, help: str = "", **kw):
    return typer.Option(default, *names, help=help, **kw)


@app.command()
def generate(
    input_json: Optional[Path] = typer.Argument(None, help="Official input JSON (prompt, cond_image, cond_audio, audio_type, bbox)."),
    input_json_opt: Optional[Path] = _opt(None, "--input_json", "--input-json", help="Same as the positional INPUT_JSON."),
    image: Optional[Path] = _opt(None, "--image", help="Reference image (instead of a JSON)."),
    audio: Optional[Path] = _opt(None, "--audio", help="Speech of person 1 (instead of a JSON)."),
    audio2: Optional[Path] = _opt(None, "--audio2", help="Speech of person 2 (two-person video)."),
    prompt: Optional[str] = _opt(None, "--prompt", help="Text prompt (instead of a JSON)."),
    audio_type: str = _opt("add", "--audio_type", "--audio-type", help="Two speakers: add (one after the other) or para (together)."),
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
    text_scale: float = _opt(5.0, "--sample_text_guide_scale", "--sample-text-guide-scale", help="Text guidance scale."),
    audio_scale: float = _opt(4.0, "--sample_audio_guide_scale", "--sample-audio-guide-scale", help="Audio guidance scale."),
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
    dtype: str = _opt("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32."),
    offload: bool = _opt(False, "--offload_model", "--offload-model", "--offload", help="Keep only the running model on the GPU."),
    fp8: bool = _opt(False, "--fp8", help="FP8 linears in the DiT (Hopper)."),
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
        config = EngineConfig(ckpt_dir=ckpt_dir, wav2vec_dir=wav2vec_dir, multitalk_dir=multitalk_dir,
                              preset=preset, device=device, dtype=dtype, offload=offload, fp8=fp8,
                              compile=compile, attention=attention, gpus=gpus or 1, parallel=parallel)
        if under_torchrun() and int(os.environ["RANK"]) != 0:
            from multitalk.pipeline.parallel import serve_from_env

            serve_from_env(config)      # rank 0 alone reads the inputs and writes the video
            return
        json_path = input_json or input_json_opt
        if json_path is not None:
            spec, warnings = load_input_json(json_path)
            for w in warnings:
                err.print(f"[yellow]warning:[/] {w}")
        else:
            if image is None or audio is None:
                raise UserInputError("input_json", "no input given",
                                     "pass INPUT_JSON, or --image and --audio [--audio2] [--prompt]")
            cond_audio = {"person1": str(audio)}
            if audio2 is not None:
                cond_audio["person2"] = str(audio2)
            spec = InputSpec.model_validate({"prompt": prompt or "", "cond_image": str(image),
                                             "cond_audio": cond_audio, "audio_type": audio_type})
        params = GenerationParams.from_cli(
            size=size, frame_num=frame_num, motion_frame=motion_frame, mode=mode, sample_steps=sample_steps,
            sample_shift=sample_shift, text_guide_scale=text_scale, audio_guide_scale=audio_scale, seed=seed,
            n_prompt=n_prompt, use_teacache=use_teacache, teacache_thresh=teacache_thresh, use_apg=use_apg,
            apg_momentum=apg_momentum, apg_norm_threshold=apg_norm_threshold,
            color_correction_strength=color_correction_strength, max_frames=max_frames)
        if out_path is not None:
            target = out_path
        elif save_file is not None:
            target = Path(save_file if save_file.endswith(".mp4") else save_file + ".mp4")
        else:
            stem = json_path.stem if json_path is not None else "multitalk"
            target = Path("outputs") / f"{stem}.mp4"
        if preset is None and ckpt_dir is None:
            raise UserInputError("ckpt_dir", "no model weights given",
                                 "pass --ckpt-dir and --wav2vec-dir (official folders), or --preset tiny")
        from multitalk.pipeline.generate import prepare_media
        from multitalk.pipeline.render import check_output_path

        check_output_path(target)
        media = prepare_media(spec, params)  # every input problem surfaces before models load
        t0 = time.perf_counter()
        with err.status("loading models ..."):
            engine = Engine.load(config)
        try:
            where = (f"{engine.device} + {engine.parallel.world - 1} more processes, --parallel {parallel}"
                     if engine.parallel is not None else f"{engine.device}")
            err.print(f"models loaded in {time.perf_counter() - t0:.1f}s ({engine.arch.name}, {where}, {engine.dtype}, "
                      f"{engine.attention} attention)")
            with ProgressView(console=err, enabled=not quiet) as view:
                result = render(engine, spec, params, target, save_tensor=save_tensor, media=media,
                                progress=view.update)
        finally:
            engine.close()
        out.print(f"wrote {target} ({result.frames} frames, {result.width}x{result.height}, "
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
        err.print(f"demo inputs written to {json_path.parent}")
        generate(input_json=json_path, input_json_opt=None, image=None, audio=None, audio2=None, prompt=None,
                 audio_type="add", out_path=out_path, save_file=None, ckpt_dir=None, multitalk_dir=None,
                 wav2vec_dir=None, preset="tiny", size=size, frame_num=frame_num,
                 motion_frame=motion_frame, mode="streaming", sample_steps=steps, sample_shift=None,
                 text_scale=5.0, audio_scale=4.0, seed=42, n_prompt="", use_teacache=False, teacache_thresh=0.2,
                 use_apg=False, apg_momentum=-0.75, apg_norm_threshold=55.0, color_correction_strength=0.0,
                 max_frames=None, device="cpu", dtype="float32", offload=False, fp8=False, attention="sdpa", compile=False,
                 gpus=None, parallel="auto", save_tensor=None, quiet=False, debug=debug)

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
        from multitalk.pipeline.weights import check_folders

        reports = check_folders(dirs)
        bad = False
        for rep in reports:
            status = "[green]ok[/]" if rep.ok else "[red]PROBLEM[/]"
            out.print(f"{status} {rep.summary()}")
            for f in rep.missing_files:
                out.print(f"    missing file: {f}")
            for k in rep.missing[:10]:
                out.print(f"    missing key: {k}")
            for k in rep.unexpected[:10]:
                out.print(f"    unexpected key: {k}")
            for k, exp, got, f in rep.mismatched[:10]:
                out.print(f"    shape mismatch: {k} expected {exp} got {got} in {f}")
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
        from multitalk.pipeline.weights import write_tiny_checkpoints

        ckpt, w2v = write_tiny_checkpoints(out_dir, seed=seed, force=force)
        out.print(f"wrote {ckpt} and {w2v}")

    _run_guarded(run)


def _check_attention(attention: str) -> None:
    """An unknown ``--attention`` is a one-line error before anything loads (the device check is Engine.load's)."""
    from multitalk.runtime.attention_int8 import MODES_CLI

    if attention not in MODES_CLI:
        raise UserInputError("attention", f"unknown attention {attention!r}", f"use one of {', '.join(MODES_CLI)}")


def _runner_options(preset, ckpt_dir, wav2vec_dir, multitalk_dir, device, dtype, attention="auto") -> dict:
    if preset is None and ckpt_dir is None:
        raise UserInputError("ckpt_dir", "no model weights given",
                             "pass --ckpt-dir and --wav2vec-dir (official folders), or --preset tiny")
    _check_attention(attention)
    opts = {"preset": preset, "device": device, "dtype": dtype, "attention": attention}
    for key, value in (("ckpt_dir", ckpt_dir), ("wav2vec_dir", wav2vec_dir), ("multitalk_dir", multitalk_dir)):
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
    attention: str = _opt("auto", "--attention", help="DiT self-attention: sdpa, int8 (Hopper) or auto."),
    debug: bool = _opt(False, "--debug", help="Show tracebacks."),
):
    """HTTP job API with one in-process worker (models loaded once)."""
    global _DEBUG
    _DEBUG = debug

    def run():
        from multitalk.service.cli_commands import serve as serve_api

        opts = _runner_options(preset, ckpt_dir, wav2vec_dir, multitalk_dir, device, dtype, attention)
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
    max_jobs: Optional[int] = _opt(None, "--max-jobs", help="Exit after N jobs."),
    attention: str = _opt("auto", "--attention", help="DiT self-attention: sdpa, int8 (Hopper) or auto."),
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
        opts = _runner_options(preset, ckpt_dir, wav2vec_dir, multitalk_dir, device, dtype, attention)
        if gpus > 1:
            opts.update(gpus=gpus, parallel=parallel)
        n = run_worker(data_dir=data_dir, runner_options=opts, max_jobs=max_jobs, db=db)
        out.print(f"worker processed {n} jobs")

    _run_guarded(run)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
