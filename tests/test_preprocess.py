"""Preprocessing parity (issue 5): image -> processor -> model, timm against transformers.

Every converted folder carries `preprocessor_config.json`; loaded with `AutoImageProcessor` it
must give timm's eval tensors (exactly with the PIL backend, within a measured bound with the
default torchvision backend), the same logits and the same top-5 through `pipeline`. The
per-variant cases run on the session's shared conversion of each variant (tests/variants.py).
"""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision.transforms import functional as TF
from transformers import AutoImageProcessor, pipeline

import deit_port.parity
import deit_port.preprocess
from deit_port import cli
from deit_port.errors import ImageLoadError
from deit_port.images import load_image
from deit_port.parity import data_config, synthetic_image
from deit_port.preprocess import (
    compare_preprocessing,
    crop_offset_differs,
    processor_kwargs,
    save_preprocessor,
)
from deit_port.tolerances import PIL_ATOL

from .util import (
    ATOL_CONTRACT,
    ATOL_MEASURED,
    DEIT_VARIANTS,
    DEVICE,
    FAST_VARIANTS,
    TINY,
    cli_error_line,
    sample_images,
)
from .variants import variant_params

TINY_ARGS = ["--init", "random", "--seed", "1"]

# Measured bounds of the default (torchvision) backend on the images below, see docs/measurements.md
# "Preprocessing". Pixels: one or two uint8 levels of its bicubic resize against PIL's
# (1 level = 1 / (255 * 0.224) = 0.0175 after normalizing): 0.0175 at 224 px (crop_pct 0.9),
# 0.0350 at 384 px (crop_pct 1.0). Logits of the random-init models: up to 1.8e-3.
DEFAULT_BACKEND_PIXEL_ATOL = 0.036
DEFAULT_BACKEND_LOGIT_ATOL = 5e-3

# timm's data configs, written down here (not derived with the code under test):
# crop S -> shortest edge floor(S / crop_pct): 224 / 0.9 -> 248, 384 / 1.0 -> 384, 160 / 0.9 -> 177.
EXPECTED_SHORTEST_EDGE = {224: 248, 384: 384, 160: 177}
# the plain ViTs' crops other than 224 (a 0.9 crop) and 384: floor(256 / 0.95), floor(518 / 1.0)
EXPECTED_SHORTEST_EDGE |= {256: 269, 518: 518}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PIL_BICUBIC = 3


def _pixels(processor, images) -> torch.Tensor:
    return torch.as_tensor(processor(images, return_tensors="pt")["pixel_values"])


@pytest.fixture(scope="session")
def tiny_timm():
    """The tiny timm model, for its data config only: built on the meta device (no weights)."""
    with torch.device("meta"):
        return timm.create_model(TINY, pretrained=False)


@pytest.fixture
def tiny_folder(tmp_path, tiny_timm) -> Path:
    """A folder holding only the preprocessor of the tiny model, as the converter writes it."""
    save_preprocessor(tmp_path, tiny_timm)
    return tmp_path


# --- what the file says -------------------------------------------------------------------


@pytest.mark.parametrize("variant", variant_params())
def test_preprocessor_config_is_timms_data_config(variant, converted_variant):
    converted = converted_variant(variant)
    saved = json.loads((converted.folder / "preprocessor_config.json").read_text())
    crop = converted.meta_model.patch_embed.img_size[0]
    assert saved["image_processor_type"] == "BitImageProcessor"
    assert saved["size"] == {"shortest_edge": EXPECTED_SHORTEST_EDGE[crop]}, saved["size"]
    assert saved["crop_size"] == {"height": crop, "width": crop}
    assert saved["resample"] == PIL_BICUBIC
    if variant in DEIT_VARIANTS:
        assert saved["image_mean"] == IMAGENET_MEAN and saved["image_std"] == IMAGENET_STD
    else:  # a plain ViT: ImageNet's or the Inception (0.5) statistics, as timm's config says
        timm_config = resolve_data_config({}, model=converted.meta_model)
        assert saved["image_mean"] == list(timm_config["mean"]), saved["image_mean"]
        assert saved["image_std"] == list(timm_config["std"]), saved["image_std"]
    assert saved["rescale_factor"] == 1 / 255
    assert all(saved[k] for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"))


def test_processor_kwargs_follow_other_data_configs():
    config = {
        "input_size": (3, 160, 160),
        "interpolation": "bilinear",
        "crop_pct": 0.95,
        "crop_mode": "squash",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
    }
    kwargs = processor_kwargs(config)
    assert kwargs["size"] == {"height": 168, "width": 168}  # floor(160 / 0.95) = 168, squashed
    assert kwargs["crop_size"] == {"height": 160, "width": 160}
    assert kwargs["resample"] == 2 and kwargs["image_mean"] == [0.5, 0.5, 0.5]
    for bad in ({"crop_mode": "border"}, {"input_size": (3, 160, 192), "crop_mode": "center"}):
        with pytest.raises(ValueError, match="cannot express|no image processor"):
            processor_kwargs(config | bad)


# --- pixels -------------------------------------------------------------------------------


# The (variant, image) pairs of `sample_images` whose crop offset is a tie that timm rounds
# and transformers floors (test_crop_offset_tie_is_one_pixel): the 518 px crop of the "wide" one.
CROP_OFFSET_TIES = {("vit_small_patch14_dinov2", "wide")}


@pytest.mark.parametrize("variant", variant_params())
def test_pixel_parity(variant, converted_variant):
    """timm's eval transform vs the saved processor, each image converted to RGB as timm's
    loader does: bit-exact with the PIL backend, within the measured bound by default."""
    converted = converted_variant(variant)
    pil = AutoImageProcessor.from_pretrained(converted.folder, backend="pil")
    default = AutoImageProcessor.from_pretrained(converted.folder)
    assert default.backend == "torchvision", "transformers' default backend changed"
    transform = create_transform(**converted.data_config)
    for name, image in sample_images().items():
        rgb = image.convert("RGB")
        if crop_offset_differs(rgb.size, converted.data_config):
            # the documented tie (test_crop_offset_tie_is_one_pixel), on the known pairs only
            assert (variant, name) in CROP_OFFSET_TIES, f"{variant} {name}: a new crop-offset tie"
            continue
        expected = transform(rgb)
        exact = _pixels(pil, [rgb])[0]
        assert exact.shape == expected.shape, f"{name}: {exact.shape} vs timm {expected.shape}"
        assert exact.dtype == expected.dtype
        assert torch.equal(exact, expected), (
            f"{variant} {name}: PIL backend differs from timm by "
            f"{(exact - expected).abs().max():.3g} (expected bit-exact)"
        )
        torch.testing.assert_close(
            _pixels(default, [rgb])[0],
            expected,
            atol=DEFAULT_BACKEND_PIXEL_ATOL,
            rtol=0,
            msg=lambda m, name=name: (
                f"{variant} {name}: default backend beyond "
                f"DEFAULT_BACKEND_PIXEL_ATOL={DEFAULT_BACKEND_PIXEL_ATOL}: {m}"
            ),
        )


def test_grayscale_needs_no_conversion_by_the_caller(tiny_folder, tiny_timm):
    gray = sample_images()["grayscale"]
    processor = AutoImageProcessor.from_pretrained(tiny_folder, backend="pil")
    expected = create_transform(**data_config(tiny_timm))(gray.convert("RGB"))
    assert torch.equal(_pixels(processor, [gray])[0], expected)


def test_transparent_rgba_is_composited_on_white_by_the_processor(tiny_folder, tiny_timm):
    """A documented difference: timm's loader (and transformers' `load_image`, used by the
    pipeline) drop the alpha channel; transformers 5's processor itself, given RGBA, composites
    it on white (4.x's drops it too)."""
    rgba = sample_images()["rgba"]
    processor = AutoImageProcessor.from_pretrained(tiny_folder, backend="pil")
    transform = create_transform(**data_config(tiny_timm))
    on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB")
    actual = _pixels(processor, [rgba])[0]
    assert torch.equal(actual, transform(on_white))
    assert not torch.equal(actual, transform(rgba.convert("RGB")))


def test_crop_offset_tie_is_one_pixel(tiny_folder, tiny_timm):
    """A documented difference: where the resized edge minus the crop is 3 mod 4 (here
    251 - 224 = 27), torchvision's CenterCrop (timm) rounds the offset 13.5 to 14 and
    transformers floors it to 13: the same resized image, cropped one pixel apart."""
    config = data_config(tiny_timm)
    image = synthetic_image(21, (251, 248))  # shortest edge already 248: no resize
    processor = AutoImageProcessor.from_pretrained(tiny_folder, backend="pil")
    actual = _pixels(processor, [image])[0]
    expected = create_transform(**config)(image)
    assert not torch.equal(actual, expected)
    floored = TF.crop(image, top=12, left=13, height=224, width=224)  # (248-224)/2, 27 // 2
    floor_crop = TF.normalize(TF.to_tensor(floored), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(actual, floor_crop), "transformers no longer crops at the floored offset"
    assert crop_offset_differs(image.size, config)
    assert not any(crop_offset_differs(img.size, config) for img in sample_images().values())
    report = compare_preprocessing(tiny_folder, tiny_timm, [synthetic_image(0), image])
    assert report.crop_offset_images == (1,) and report.matches, report.summary()


# --- logits -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, atol, bound",
    [
        ("pil", ATOL_MEASURED, "ATOL_MEASURED"),
        ("torchvision", DEFAULT_BACKEND_LOGIT_ATOL, "DEFAULT_BACKEND_LOGIT_ATOL"),
    ],
)
@pytest.mark.parametrize("variant", variant_params())
def test_end_to_end_logits(variant, converted_variant, backend, atol, bound, record_property):
    """timm transform + timm model vs the folder's processor + transformers model, on the
    variant's model images (all four for the fast variants, one for the others: what a size
    adds, the input size and the crop, one image shows). Both sides' logits come from their
    model's one pass (tests/variants.py): timm's when the variant was built, transformers' on
    the processor's pixel values of these images, both backends in one batch."""
    converted = converted_variant(variant)
    names = converted.images
    expected = torch.stack([converted.image_logits[n] for n in names])
    outputs = converted.hf_outputs.images[backend]
    actual = torch.stack([outputs[n] for n in names])
    diff = (actual - expected).abs()
    record_property("variant", f"{variant} (image->logits, {backend} backend)")
    record_property("max_abs_diff", float(diff.max()))
    record_property("mean_abs_diff", float(diff.mean()))
    if backend == "pil":
        torch.testing.assert_close(
            actual,
            expected,
            atol=ATOL_CONTRACT,
            rtol=0,
            msg=lambda m: f"{variant}: beyond the contract atol {ATOL_CONTRACT}: {m}",
        )
    torch.testing.assert_close(
        actual,
        expected,
        atol=atol,
        rtol=0,
        msg=lambda m: f"{variant} ({backend}): beyond {bound}={atol}: {m}",
    )
    top1 = (actual.argmax(-1), expected.argmax(-1))
    assert torch.equal(*top1), f"{variant} ({backend}): top-1 {top1[0]} vs timm {top1[1]}"


@pytest.mark.parametrize("variant", variant_params(sorted(FAST_VARIANTS)))
def test_pipeline_top5_matches_timm(variant, converted_variant):
    """`pipeline("image-classification", model=folder)`, given the images as they are (RGBA
    and grayscale included), returns timm's top-5 labels. A pass of its own: what is tested is
    the pipeline's path (it loads the folder itself, picks the model class from its config,
    reads the processor, names the classes from id2label), which belongs to a family, not a
    size: the fast variants, one of each family, run it; the other variants' logits end to
    end through both backends are `test_end_to_end_logits`'."""
    converted = converted_variant(variant)
    images = sample_images()
    names = ["landscape", "rgba", "grayscale"]
    id2label = json.loads((converted.folder / "config.json").read_text())["id2label"]
    timm_top5 = [converted.image_logits[n].topk(5).indices for n in names]
    pipe = pipeline("image-classification", model=str(converted.folder), device=DEVICE)
    results = pipe([images[n] for n in names])
    for name, result, top5 in zip(names, results, timm_top5, strict=True):
        expected = [id2label[str(int(i))] for i in top5]
        assert [r["label"] for r in result] == expected, f"{variant} {name}"


# --- the hub's own preprocessing is reported --------------------------------------------

HUB_CONFIGS = {
    # what transformers' convert_deit_timm_to_pytorch.py writes: DeiTImageProcessor defaults
    "converter": {
        "image_processor_type": "DeiTImageProcessor",
        "do_resize": True,
        "size": {"height": 256, "width": 256},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    },
    # the legacy feature-extractor format of the facebook/deit-* repositories
    "legacy": {
        "feature_extractor_type": "DeiTFeatureExtractor",
        "do_resize": True,
        "size": 256,
        "resample": 3,
        "do_center_crop": True,
        "crop_size": 224,
        "do_normalize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
    },
}


def test_compare_preprocessing_passes_the_written_folder(tiny_folder, tiny_timm):
    report = compare_preprocessing(tiny_folder, tiny_timm, list(sample_images().values()))
    assert report.matches, report.summary()
    assert report.max_abs_diff == 0.0 and report.mismatched_fields == {}
    assert report.images == 7 and "PASS" in report.summary()
    default = compare_preprocessing(
        tiny_folder, tiny_timm, list(sample_images().values()), backend="torchvision"
    )
    assert default.matches and 0 < default.max_abs_diff <= DEFAULT_BACKEND_PIXEL_ATOL


@pytest.mark.parametrize("hub", sorted(HUB_CONFIGS))
@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_compare_preprocessing_reports_the_hub_config(tmp_path, tiny_timm, hub, backend):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(HUB_CONFIGS[hub]))
    images = [sample_images()[n].convert("RGB") for n in ("landscape", "portrait", "grayscale")]
    report = compare_preprocessing(tmp_path, tiny_timm, images, backend=backend)
    assert not report.matches, report.summary()
    assert "size" in report.mismatched_fields, report.mismatched_fields
    assert ("image_mean" in report.mismatched_fields) == (hub == "converter")
    # the measured diff is what one gets by running both sides by hand
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
    transform = create_transform(**data_config(tiny_timm))
    by_hand = max(float((_pixels(processor, [i])[0] - transform(i)).abs().max()) for i in images)
    assert report.max_abs_diff == pytest.approx(by_hand, abs=1e-6)
    assert by_hand > 10 * DEFAULT_BACKEND_PIXEL_ATOL
    assert "FAIL" in report.summary() and "size=" in report.summary()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"image_std": [0.5, 0.5, 0.5]}, "image_std"),
        ({"resample": 2}, "resample"),
        ({"size": {"shortest_edge": 256}}, "size"),
        ({"crop_size": {"height": 223, "width": 223}}, "crop_size"),
        ({"do_center_crop": False}, "do_center_crop"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_compare_preprocessing_catches_one_wrong_field(tiny_folder, tiny_timm, change, field):
    path = tiny_folder / "preprocessor_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    report = compare_preprocessing(tiny_folder, tiny_timm, [synthetic_image(0)])
    assert not report.matches
    assert list(report.mismatched_fields) == [field], report.mismatched_fields
    assert report.max_abs_diff > PIL_ATOL, report.summary()


def test_convert_refuses_a_processor_that_differs_from_timm(tmp_path, monkeypatch, capsys):
    def hub_preprocessor(folder, timm_model):
        Path(folder, "preprocessor_config.json").write_text(json.dumps(HUB_CONFIGS["converter"]))

    monkeypatch.setattr(deit_port.preprocess, "save_preprocessor", hub_preprocessor)
    argv = ["convert", TINY, str(tmp_path / "out"), *TINY_ARGS]
    line = cli_error_line(argv, capsys, code=1, unchanged=tmp_path)
    assert "preprocessing FAIL" in line and "image_mean" in line


@pytest.mark.parametrize("variant", sorted(FAST_VARIANTS))
def test_custom_finetune_follows_its_data_config(tmp_path, variant):
    """img_size=160: crop 160, shortest edge floor(160 / 0.9) = 177, pixels exact."""
    with torch.device("meta"):
        timm_model = timm.create_model(variant, pretrained=False, num_classes=37, img_size=160)
    save_preprocessor(tmp_path, timm_model)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["crop_size"] == {"height": 160, "width": 160}
    assert saved["size"] == {"shortest_edge": EXPECTED_SHORTEST_EDGE[160]}
    report = compare_preprocessing(tmp_path, timm_model, list(sample_images().values()))
    assert report.matches and report.max_abs_diff == 0.0, report.summary()


# --- --image ------------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


SERVED_IMAGE = synthetic_image(31, (200, 150))
ROUTES = {  # path -> (status, content type or None, body)
    "/cat.png": (200, "image/png", _png(SERVED_IMAGE)),
    "/octet": (200, "application/octet-stream", _png(SERVED_IMAGE)),
    "/page.html": (200, "text/html; charset=utf-8", b"<html><body>not an image</body></html>"),
    "/broken.png": (200, "image/png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
    "/big.png": (200, "image/png", _png(synthetic_image(32, (400, 400)))),
}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow.png":
            time.sleep(1.0)
        if self.path == "/unsized.png":  # no Content-Length: streamed until the connection ends
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(ROUTES["/big.png"][2])
            return
        status, ctype, body = ROUTES.get(self.path, (404, "text/plain", b"not found"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that hangs up early (size cap, timeout) is expected here


@pytest.fixture(scope="module")
def server():
    """An http.server on 127.0.0.1 (ephemeral port, threaded), serving ROUTES."""
    httpd = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NO_PROXY", "127.0.0.1")
        mp.setenv("no_proxy", "127.0.0.1")
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_image_from_file_and_url_join_the_parity_batch(tmp_path, server, monkeypatch, capsys):
    local = sample_images()["portrait"]
    path = tmp_path / "mine.png"
    local.save(path)
    seen = []

    original = deit_port.parity.parity_inputs

    def spy(timm_model, *args, images=None, **kwargs):
        seen.append(images)
        return original(timm_model, *args, images=images, **kwargs)

    monkeypatch.setattr(deit_port.parity, "parity_inputs", spy)
    out = tmp_path / "out"
    argv = ["convert", TINY, str(out), *TINY_ARGS, "--image", str(path)]
    argv += ["--image", f"{server}/cat.png"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "parity PASS" in capsys.readouterr().out
    assert (out / "preprocessor_config.json").is_file()
    (batch,) = seen
    assert len(batch) == 3, "the synthetic image, then the user's images in order"
    assert np.array_equal(np.asarray(batch[1]), np.asarray(local))
    assert np.array_equal(np.asarray(batch[2]), np.asarray(SERVED_IMAGE))


@pytest.mark.parametrize(
    "source, message",
    [
        ("/missing.png", "HTTP 404"),
        ("/page.html", "not an image (Content-Type text/html)"),
        ("/broken.png", "not a decodable image"),
        ("no/such/file.png", "cannot read"),
    ],
    ids=["404", "html", "undecodable", "missing-file"],
)
def test_bad_image_exits_2_and_writes_nothing(tmp_path, server, capsys, source, message):
    src = f"{server}{source}" if source.startswith("/") else str(tmp_path / source)
    argv = ["convert", TINY, str(tmp_path / "out"), *TINY_ARGS, "--image", src]
    line = cli_error_line(argv, capsys, unchanged=tmp_path)
    assert message in line and src in line


def test_load_image_limits(server):
    assert np.array_equal(np.asarray(load_image(f"{server}/octet")), np.asarray(SERVED_IMAGE))
    big = len(ROUTES["/big.png"][2])
    assert load_image(f"{server}/big.png", max_bytes=big).size == (400, 400)
    for path in ("/big.png", "/unsized.png"):  # refused by Content-Length, or while reading
        with pytest.raises(ImageLoadError, match="more than"):
            load_image(f"{server}{path}", max_bytes=big - 1)
    with pytest.raises(ImageLoadError, match="cannot fetch"):
        load_image(f"{server}/slow.png", timeout=0.2)
    with pytest.raises(ImageLoadError, match="cannot fetch"):
        load_image("http://127.0.0.1:9/nothing-listens-here.png", timeout=2)


def test_load_image_applies_exif_orientation(tmp_path):
    image = synthetic_image(41, (120, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.size == (60, 120) and loaded.mode == "RGB"
