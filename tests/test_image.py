"""Conditioning image: buckets, resize + centre crop against golden section (c), and bad input."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from multitalk.errors import UserInputError
from multitalk.media.image import (
    ASPECT_RATIO_627,
    ASPECT_RATIO_960,
    bucket_key,
    center_crop_offsets,
    choose_bucket,
    cond_image_from_uint8,
    load_image,
    resize_and_center_crop,
    resized_size,
)

IMAGES = {"multi1": "multi/1/multi1.png", "single1": "single/single1.png", "multi3": "multi/3/multi3.png"}


@pytest.fixture(scope="module")
def image_vectors(golden_vectors):
    return golden_vectors("image_vae")


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_bucket_and_sizes_match_reference(examples, golden_scalars, name):
    rec = golden_scalars["image_vae"]["images"][name]
    assert rec["file"] == IMAGES[name]
    img = load_image(examples / IMAGES[name])
    assert [img.height, img.width] == rec["src_hw"]
    th, tw = choose_bucket(img.height, img.width, "multitalk-480")
    assert bucket_key(img.height, img.width) == rec["bucket_key"]
    assert [th, tw] == rec["target_hw"]
    assert list(resized_size(img.height, img.width, th, tw)) == rec["resized_hw"]


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_cond_image_u8_exact(examples, image_vectors, name):
    img = load_image(examples / IMAGES[name])
    pixels = resize_and_center_crop(img, *choose_bucket(img.height, img.width))
    ref = image_vectors[f"{name}_cond_image_u8"]  # [1, 3, 1, th, tw]
    assert pixels.dtype == torch.uint8
    assert pixels.shape == ref[0, :, 0].shape
    assert (pixels.int() - ref[0, :, 0].int()).abs().max().item() == 0


def test_cond_image_float_exact(examples, image_vectors):
    img = load_image(examples / IMAGES["multi1"])
    cond = cond_image_from_uint8(resize_and_center_crop(img, *choose_bucket(img.height, img.width)))
    ref = image_vectors["multi1_cond_image"][0, :, 0]
    assert cond.dtype == torch.float32
    assert (cond - ref).abs().max().item() == 0.0


def test_alpha_is_dropped_not_composited(examples):
    # single1.png is RGBA: the official code keeps the RGB values under transparent pixels.
    path = examples / IMAGES["single1"]
    with Image.open(path) as raw:
        assert raw.mode == "RGBA"
        expected = raw.convert("RGB").tobytes()
    img = load_image(path)
    assert img.mode == "RGB" and img.tobytes() == expected


def test_bucket_tables_and_other_ratios():
    assert len(ASPECT_RATIO_627) == 15 and len(ASPECT_RATIO_960) == 21
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in [*ASPECT_RATIO_627.values(), *ASPECT_RATIO_960.values()])
    assert choose_bucket(1358, 2362) == (448, 896)              # multi2.png (README)
    assert choose_bucket(2560, 1440) == (832, 448)              # portrait 16:9 -> '1.86'
    assert choose_bucket(1000, 1000) == (640, 640)
    assert choose_bucket(1440, 2560, "multitalk-720") == (704, 1280)  # 0.5625 -> '0.55'
    assert choose_bucket(10, 1000) == (320, 1216)               # beyond the table: the extreme bucket


def test_centre_crop_uses_python_rounding():
    # (3-2)/2 = 0.5 rounds to 0 and (7-2)/2 = 2.5 rounds to 2 (round half to even, like torchvision).
    assert center_crop_offsets(3, 7, 2, 2) == (0, 2)
    assert center_crop_offsets(504, 896, 448, 896) == (28, 0)
    assert center_crop_offsets(512, 830, 512, 768) == (0, 31)


def test_small_image_is_upscaled_to_the_bucket(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (90, 50), (10, 200, 30)).save(path)
    img = load_image(path)
    th, tw = choose_bucket(img.height, img.width)
    pixels = resize_and_center_crop(img, th, tw)
    assert pixels.shape == (3, th, tw)
    assert pixels[:, th // 2, tw // 2].tolist() == [10, 200, 30]


# ----------------------------------------------------------------------------- bad input

def test_missing_file(tmp_path):
    with pytest.raises(UserInputError) as e:
        load_image(tmp_path / "nope.png")
    assert e.value.field == "cond_image" and "not found" in e.value.message


def test_directory_and_custom_field(tmp_path):
    with pytest.raises(UserInputError) as e:
        load_image(tmp_path, field="image")
    assert e.value.field == "image"


@pytest.mark.parametrize("content", [b"", b"hello, not an image", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_not_an_image(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(UserInputError) as e:
        load_image(path)
    assert e.value.field == "cond_image" and e.value.fix


def test_truncated_image(tmp_path, examples):
    data = (examples / IMAGES["multi1"]).read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserInputError):
        load_image(path)


def test_bad_sizes_and_bucket_name():
    with pytest.raises(UserInputError) as e:
        choose_bucket(100, 100, "multitalk-1080")
    assert e.value.field == "size"
    for h, w in [(0, 10), (10, -1), (1.5, 10)]:
        with pytest.raises(UserInputError):
            choose_bucket(h, w)
    with pytest.raises(UserInputError):
        resize_and_center_crop("image.png", 448, 896)
    with pytest.raises(UserInputError):
        cond_image_from_uint8(torch.zeros(3, 8, 8))


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored landscape with EXIF orientation 6 (rotate 90 degrees clockwise to show)
    is used as displayed: portrait, with the stored left edge at the top."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))             # stored left half red
    exif = Image.Exif()
    exif[0x0112] = 6                                       # Orientation: rotate 90 CW
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "phone.jpg")
    assert upright.size == (20, 40)                        # (width, height): portrait
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    stored.save(tmp_path / "plain.jpg", quality=95)        # no EXIF: as stored
    assert load_image(tmp_path / "plain.jpg").size == (40, 20)
