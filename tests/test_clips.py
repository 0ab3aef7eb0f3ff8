"""Clip plan: the official windows / padding / trim of every e2e run, and the audio-following default."""

import pytest
import torch

from multitalk.errors import UserInputError
from multitalk.pipeline.clips import (audio_window_indices, frames_for_audio, pad_tail, plan_clips)

CASES = ["e2e_single_clip", "e2e_multi_add_bbox_stream", "e2e_multi_para_stream"]


def _official_plan(run):
    p = run["params"]
    lens = run["clips"][0]["embed_len"]
    return plan_clips(lens, frame_num=p["frame_num"], motion_frame=p["motion_frame"], mode=p["mode"],
                      max_frames=p["max_frames_num"], official=True)


@pytest.mark.parametrize("case", CASES)
def test_official_plan_matches_golden(golden_scalars, case):
    run = golden_scalars["e2e"][case]
    plan = _official_plan(run)
    assert plan.num_clips == run["n_clips"]
    got = [(c.start, c.end, list(c.embed_lens), c.cond_frames) for c in plan.clips]
    want = [(c["audio_start_idx"], c["audio_end_idx"], c["embed_len"], c["cond_frames"]) for c in run["clips"]]
    assert got == want
    assert list(plan.pad_lengths) == run["miss_lengths"]
    assert plan.total_frames == run["video_shape"][1]
    assert plan.clips[-1].is_last and not any(c.is_last for c in plan.clips[:-1])


def test_official_trim_drops_the_padding_frames(golden_scalars):
    run = golden_scalars["e2e"]["e2e_multi_para_stream"]
    plan = _official_plan(run)
    assert plan.source_lens == (44, 77)
    assert plan.generated_frames == 45 and plan.total_frames == 41  # 44 audio frames -> 41 video frames


def test_default_plan_follows_the_audio():
    # the e2e(iii) speakers (44 and 77 frames): the official stops at person 1, the default covers both
    plan = plan_clips([44, 77], frame_num=9, motion_frame=5, mode="streaming")
    assert plan.total_frames == 77  # the longest speaker
    assert plan.clips[-1].end >= 77 and plan.clips[-2].end < 77


@pytest.mark.parametrize("case,vectors", [("e2e_single_clip", "dit_1person"),
                                          ("e2e_multi_add_bbox_stream", "dit_2person_bbox")])
def test_first_clip_audio_windows_match_dit_input(golden_scalars, golden_vectors, case, vectors):
    run = golden_scalars["e2e"][case]
    embs = [v for k, v in sorted(golden_vectors(case).items()) if k.startswith("audio_emb_person")]
    plan = _official_plan(run)
    audio = plan.audio_windows(plan.pad_embeddings(embs), plan.clips[0])
    assert torch.equal(audio, golden_vectors(vectors)["audio"])


def test_window_indices_are_clamped():
    idx = audio_window_indices(0, 3, 4)
    assert idx.tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3]]
    assert audio_window_indices(10, 12, 100).tolist() == [[8, 9, 10, 11, 12], [9, 10, 11, 12, 13]]


def test_tail_padding_is_the_official_reflection():
    emb = torch.arange(6.0)[:, None]
    assert pad_tail(emb, 4)[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 5, 4, 3, 2]
    assert pad_tail(emb, 0).shape[0] == 6
    # longer than the track (default mode, very short audio): keeps reflecting
    assert pad_tail(emb[:2], 5)[:, 0].tolist() == [0, 1, 1, 0, 0, 1, 1]


def test_official_padding_applies_only_from_the_last_clip():
    plan = plan_clips([20, 20], frame_num=9, motion_frame=5, mode="streaming", official=True)
    # windows end 9, 13, 17, 21 -> the 4th clip is the last; pad = 21 - 20 + 3
    assert [c.end for c in plan.clips] == [9, 13, 17, 21]
    assert plan.pad_lengths == (4, 4)
    assert [c.embed_lens for c in plan.clips] == [(20, 20)] * 3 + [(24, 24)]
    assert plan.total_frames == 21 - 4
    embs = [torch.arange(20.0)[:, None], torch.arange(100.0, 120.0)[:, None]]
    padded = plan.pad_embeddings(embs)
    # an earlier clip clamps at the original end even though the padded tensor is longer
    third = plan.audio_windows(padded, plan.clips[2])
    assert third[0, -1, :, 0].tolist() == [14, 15, 16, 17, 18]
    last = plan.audio_windows(padded, plan.clips[3])
    assert last[0, -1, :, 0].tolist() == [18, 19, 19, 18, 17]


def test_official_quirks():
    # capped before person 1 ends but after person 2 ends: only person 2 is padded, and the
    # official video[:, :, :-0] keeps no frame at all
    plan = plan_clips([121, 15], frame_num=9, motion_frame=5, mode="streaming", max_frames=17, official=True)
    assert plan.pad_lengths[0] == 0 and plan.pad_lengths[1] > 0 and plan.total_frames == 0
    # the official refuses audio not longer than one clip
    with pytest.raises(UserInputError) as e:
        plan_clips(9, frame_num=9, motion_frame=5, mode="clip", official=True)
    assert e.value.field == "cond_audio"
    # clip mode: one clip of exactly frame_num frames
    plan = plan_clips(267, frame_num=9, motion_frame=5, mode="clip", official=True)
    assert plan.num_clips == 1 and plan.total_frames == 9
    # streaming cap of 1000 frames
    plan = plan_clips(2000, frame_num=81, motion_frame=25, mode="streaming", official=True)
    assert plan.total_frames == 1000


@pytest.mark.parametrize("frame_num,motion_frame", [(9, 5), (81, 25), (33, 9), (13, 1)])
def test_default_output_length_equals_audio_length(frame_num, motion_frame):
    for n in range(1, 260):
        for lens in ([n], [n, max(1, n - 7)], [max(1, n // 2), n]):
            plan = plan_clips(lens, frame_num=frame_num, motion_frame=motion_frame, mode="streaming")
            assert plan.total_frames == n, (lens, plan)
            assert plan.generated_frames >= n
            assert plan.generated_frames - n < frame_num  # no useless extra clip
            last = plan.clips[-1]
            # every window index is inside the (padded) embeddings
            assert all(ln >= last.end + 2 or ln == src for ln, src in zip(last.embed_lens, lens))
            starts = [c.start for c in plan.clips]
            assert starts == list(range(0, len(starts) * (frame_num - motion_frame), frame_num - motion_frame))
            assert frames_for_audio(max(lens), frame_num, motion_frame, "streaming") == n


def test_single_length_plan_applies_to_every_speaker():
    plan = plan_clips(20, frame_num=9, motion_frame=5, mode="streaming")
    embs = [torch.arange(20.0)[:, None], torch.arange(20.0)[:, None] + 100]
    padded = plan.pad_embeddings(embs)
    assert [e.shape[0] for e in padded] == [24, 24]
    assert plan.audio_windows(padded, plan.clips[-1]).shape == (2, 9, 5, 1)
    with pytest.raises(ValueError):
        plan_clips([20, 20], frame_num=9, motion_frame=5).pad_embeddings(embs[:1])


def test_default_clip_mode_and_cap():
    assert frames_for_audio(3, 81, 25, "clip") == 3          # short audio: padded, video trimmed
    assert frames_for_audio(500, 81, 25, "clip") == 81
    assert frames_for_audio(500, 81, 25, "streaming", max_frames=200) == 200
    plan = plan_clips(3, frame_num=9, motion_frame=5, mode="streaming")
    assert plan.num_clips == 1 and plan.pad_lengths == (9,)
    padded = plan.pad_embeddings([torch.arange(3.0)[:, None]])[0]
    assert padded.shape[0] == 12


@pytest.mark.parametrize("kw,field", [(dict(frame_num=8), "frame_num"), (dict(motion_frame=9), "motion_frame"),
                                      (dict(mode="loop"), "mode"), (dict(max_frames=0), "max_frames")])
def test_bad_geometry(kw, field):
    args = dict(frame_num=9, motion_frame=5, mode="streaming")
    args.update(kw)
    with pytest.raises(UserInputError) as e:
        plan_clips(100, **args)
    assert e.value.field == field
