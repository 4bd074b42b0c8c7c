"""Converted folders in transformers.js (npm `@huggingface/transformers`, pinned in
examples/web/package.json): in node, and in a real headless Chromium through the page a user
copies (examples/web/index.html).

Every folder is given `HF_DIR/onnx/` by `deit-port export-onnx HF_DIR/`, the command a user
runs, and nothing else. The three fast variants are converted at depth 2, as tests/test_onnx.py
exports them (the structure of each family, at a fraction of a 12-block export's time); the
trained digits model of examples/train_convert_pipeline.py (the session's `digits_run`,
shared with tests/test_real_training.py) as it is. Each folder, and
each node or Chromium run on it, is made once per session (tests/build_once.py) and read by
the cases below.

What is compared, and the bounds:
- the model alone, timm's pixel values fed in: logits within `MODEL_ONLY_ATOL` (1e-4);
- end to end, transformers.js's own image processor reading our `preprocessor_config.json`:
  it resizes its own way (node: sharp's `affine` with a bicubic interpolator, no antialiasing,
  the pixel grid anchored at the corner; Chromium: a canvas `drawImage`), not as PIL does, so
  pixel values differ. Asserted: the model accounts for none of the difference (timm's model
  on transformers.js's own pixel values gives its logits within 1e-4), and on the 224 px test
  images the logits stay within `END_TO_END_ATOL` of timm's (see there);
- int8 (`dtype: 'q8'`), on the trained digits model, end to end: top-1 agreement with float32
  >= 98% on the PNGs as they are and on the PNGs resized by PIL first (timm's pixel values:
  the quantization alone), where its accuracy is also within 1 point of timm's; in Chromium
  (whose default dtype it is) >= 98% agreement with the model alone on timm's pixel values.

Locally these skip, each with a one-line reason, without node, the npm packages or Chromium;
under CI=true they fail instead (tests/web.py `need`). docs/browser.md is written from what
they record: `pytest tests/test_browser.py --runslow -p no:xdist --browser-table docs/browser.md`.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deit_port import cli
from deit_port.errors import ParityError
from deit_port.onnx_folder import MODEL_FILE, QUANTIZED_FILE
from deit_port.onnx_quantize import quantize_onnx

from .build_once import build_once, session_root
from .digits import example
from .util import (
    ATOL_MEASURED,
    FAST_VARIANTS,
    MODEL_IMAGES,
    SEED,
    TINY,
    model_output,
    need_module,
    sample_images,
)
from .web import classify, f32_base64, headless, need, read_f32, run_module, serve, write_f32

MODEL_ONLY_ATOL = ATOL_MEASURED  # 1e-4: the ONNX file computes what timm computes
# End to end on the seeded random variants (MODEL_IMAGES: 80x100 to 320x240 px): transformers.js
# resizes with another kernel and alignment than PIL, so its pixel values differ (measured on
# these images: 0.03 mean, up to 2.1 after normalisation) and the logits move with them
# (measured up to 0.12 at full depth, 0.07 in Chromium). The bound catches a wrong processor
# setting (a crop, mean/std or channel order off moves these logits by 1 and more), not the
# kernel difference.
END_TO_END_ATOL = 0.3
MIN_Q8_AGREEMENT = 0.98  # the floor for int8 vs float32 top-1 on the digits
MAX_Q8_ACCURACY_DROP = 0.01  # one point of held-out accuracy
BROWSER_DIGITS = 100  # held-out digits the page classifies (WASM; node classifies all 450)
IMAGES_IN_CHECK = 6  # digits given to `export-onnx --image` (the int8 check's batch)
# The fast variants, each a folder of its own in node: DeiT tiny in every run, the distilled
# one (transformers.js's DeiT class with the teacher) and DeiT III under --runslow, so that
# `-k tiny` builds one folder (an export and a quantization), not two.
FAST = [
    pytest.param(name, id=name, marks=() if name == TINY else pytest.mark.slow)
    for name in sorted(FAST_VARIANTS)
]
DEPTH = 2


@pytest.fixture(scope="session")
def web_root(tmp_path_factory) -> Path:
    return session_root(tmp_path_factory) / "web"


# --- the fast variants: a shared folder each, node runs on it -------------------------------


@dataclass
class WebFolder:
    """A fast variant at depth `DEPTH`, seeded random weights: timm's state dict
    (`timm.safetensors`), its conversion exported by `export-onnx` (`out/`), timm's outputs
    (`reference.safetensors`: `inputs`, the parity inputs, and `expected`, timm's logits on
    them; `image_pixels` and `image_logits`, timm's eval transform and logits on
    `MODEL_IMAGES`), `inputs.f32` and `images/NAME.png` for node and the page."""

    name: str
    root: Path

    @property
    def folder(self) -> Path:
        return self.root / "out"

    @property
    def pixels(self) -> Path:
        return self.root / "inputs.f32"

    @property
    def images(self) -> list[Path]:
        return [self.root / "images" / f"{n}.png" for n in MODEL_IMAGES]

    @functools.cached_property
    def reference(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.root / "reference.safetensors")

    @functools.cached_property
    def timm_model(self) -> torch.nn.Module:
        from safetensors.torch import load_file

        from deit_port.source import build_on_meta

        model = build_on_meta(self.name, depth=DEPTH)
        model.load_state_dict(load_file(self.root / "timm.safetensors"), strict=True, assign=True)
        return model.eval()

    @property
    def labels(self) -> dict[int, str]:
        config = json.loads((self.folder / "config.json").read_text())
        return {int(k): v for k, v in config["id2label"].items()}


def _build_web_folder(name: str, tmp: Path) -> None:
    from safetensors.torch import save_file
    from timm.data import create_transform

    from deit_port.convert import convert_deit_checkpoint
    from deit_port.parity import data_config, parity_inputs

    from .util import random_timm_model

    tmp.mkdir()
    model = random_timm_model(name, seed=SEED, depth=DEPTH)
    inputs = parity_inputs(model, n=4, seed=SEED)
    transform = create_transform(**data_config(model))
    images = sample_images()
    pixels = torch.stack([transform(images[n].convert("RGB")) for n in MODEL_IMAGES])
    reference = {
        "inputs": inputs,
        "expected": model_output(model, inputs),
        "image_pixels": pixels,
        "image_logits": model_output(model, pixels),
    }
    save_file({k: v.contiguous() for k, v in reference.items()}, tmp / "reference.safetensors")
    save_file(model.state_dict(), tmp / "timm.safetensors")
    out = tmp / "out"
    convert_deit_checkpoint(
        name, out, checkpoint=tmp / "timm.safetensors", model_kwargs={"depth": DEPTH}, verify=False
    )
    # the user's command, exactly: `deit-port export-onnx out/` (no MODEL: checked against
    # the folder's transformers model; the cases below compare with timm themselves)
    assert cli.main(["-q", "export-onnx", f"{out}/"]) == 0
    write_f32(tmp / "inputs.f32", inputs)
    (tmp / "images").mkdir()
    for n in MODEL_IMAGES:
        images[n].save(tmp / "images" / f"{n}.png")


@pytest.fixture(scope="session")
def web_folder(web_root):
    """`get(name) -> WebFolder`, made once per session."""
    need_module("onnxruntime")
    made: dict[str, WebFolder] = {}

    def get(name: str) -> WebFolder:
        if name not in made:
            root = build_once(web_root / name, lambda tmp: _build_web_folder(name, tmp))
            made[name] = WebFolder(name, root)
        return made[name]

    return get


@pytest.fixture(scope="session")
def node_run(web_folder):
    """`get(name) -> (WebFolder, classify.mjs's JSON, its pixel values)`: fp32, the model on
    timm's parity inputs and the pipeline on `MODEL_IMAGES` with logits; once a session."""

    def get(name: str):
        need("node", "packages")
        w = web_folder(name)
        image_shape = tuple(w.reference["image_pixels"].shape)

        def build(tmp: Path) -> None:
            tmp.mkdir()
            out = classify(
                w.folder,
                images=w.images,
                pixels=w.pixels,
                shape=tuple(w.reference["inputs"].shape),
                logits=True,
                pixel_values_out=tmp / "pixel_values.f32",
            )
            (tmp / "out.json").write_text(json.dumps(out))

        done = build_once(w.root / "node-fp32", build)
        out = json.loads((done / "out.json").read_text())
        return w, out, read_f32(done / "pixel_values.f32", image_shape)

    return get


@pytest.mark.parametrize("variant", FAST)
def test_node_model_alone_matches_timm(variant, node_run, record_property):
    w, out, _ = node_run(variant)
    actual, expected = torch.tensor(out["pixels"]["logits"]), w.reference["expected"]
    diff = (actual - expected).abs()
    record_property(
        "measured",
        [("transformers.js node: model alone, fp32", variant, _maxmean(diff, MODEL_ONLY_ATOL))],
    )
    torch.testing.assert_close(
        actual,
        expected,
        atol=MODEL_ONLY_ATOL,
        rtol=0,
        msg=lambda m: f"{variant}: transformers.js (node) on timm's pixels vs timm: {m}",
    )


@pytest.mark.parametrize("variant", FAST)
def test_node_end_to_end_differs_by_the_resize_only(variant, node_run, record_property):
    """transformers.js's image processor on the PNGs: its logits against timm's on the same
    images (bounded, `END_TO_END_ATOL`), and against timm's model on transformers.js's own
    pixel values (<= 1e-4: the difference is all in the pixels)."""
    w, out, js_pixels = node_run(variant)
    js_logits = torch.tensor([entry["logits"] for entry in out["images"]])
    on_js_pixels = model_output(w.timm_model, js_pixels)
    pixel_diff = (js_pixels - w.reference["image_pixels"]).abs()
    diff = (js_logits - w.reference["image_logits"]).abs()
    record_property(
        "measured",
        [
            ("transformers.js node: pixel values vs timm's", variant, _maxmean(pixel_diff)),
            ("transformers.js node: end to end, fp32", variant, _maxmean(diff, END_TO_END_ATOL)),
        ],
    )
    torch.testing.assert_close(
        js_logits,
        on_js_pixels,
        atol=MODEL_ONLY_ATOL,
        rtol=0,
        msg=lambda m: f"{variant}: timm on transformers.js's pixel values vs transformers.js: {m}",
    )
    assert float(diff.max()) <= END_TO_END_ATOL, (
        f"{variant}: end to end, max |logit diff| {float(diff.max()):.3g} > {END_TO_END_ATOL} "
        f"(pixel values: max {float(pixel_diff.max()):.3g}, mean {float(pixel_diff.mean()):.3g})"
    )


@pytest.mark.parametrize("variant", FAST)
def test_node_pipeline_returns_the_folders_labels(variant, node_run):
    """`pipeline('image-classification', dir)`'s top 5 are the config's `id2label` names of
    the 5 largest logits, in order."""
    w, out, _ = node_run(variant)
    id2label = w.labels
    for entry in out["images"]:
        top5 = torch.tensor(entry["logits"]).topk(5).indices.tolist()
        assert [a["label"] for a in entry["labels"]] == [id2label[i] for i in top5], entry["file"]
        scores = [a["score"] for a in entry["labels"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6, scores


def _maxmean(diff: torch.Tensor, bound: float | None = None) -> str:
    text = f"max {float(diff.max()):.3g}, mean {float(diff.mean()):.3g}"
    return text + (f" (bound {bound:g})" if bound is not None else "")


# --- `deit-port export-onnx out/`, then pipeline('image-classification', 'out/') ------------

PIPELINE_OUT = """
import { env, pipeline } from '@huggingface/transformers';
env.allowRemoteModels = false;
const answers = {};
for (const dtype of [undefined, 'fp32', 'q8']) {
  const classify = await pipeline('image-classification', 'out/', dtype ? { dtype } : {});
  answers[dtype ?? 'default'] = await classify('image.png');
}
console.log(JSON.stringify(answers));
"""


@pytest.mark.parametrize("variant", [TINY])
def test_export_onnx_then_pipeline_in_node(variant, web_folder, tmp_path):
    """What a user does, and nothing else: `deit-port export-onnx out/` (the shared folder was
    made so), then, in node, `pipeline('image-classification', 'out/')` with the default dtype,
    fp32 and q8."""
    need("node", "packages")
    w = web_folder(variant)
    (tmp_path / "out").symlink_to(w.folder, target_is_directory=True)
    shutil.copyfile(w.images[0], tmp_path / "image.png")
    assert sorted(p.name for p in (w.folder / "onnx").iterdir()) == [MODEL_FILE, QUANTIZED_FILE]
    answers = run_module(PIPELINE_OUT, cwd=tmp_path)
    labels = set(w.labels.values())
    for dtype, answer in answers.items():
        assert len(answer) == 5 and {a["label"] for a in answer} <= labels, (dtype, answer)
    # node's default device is the CPU, whose default dtype is fp32: the same answer
    assert answers["default"] == answers["fp32"]
    assert answers["q8"] != answers["fp32"]  # the int8 file was read: other scores


@pytest.mark.parametrize("variant", [TINY])
def test_export_onnx_records_the_int8_check_in_the_model_card(variant, web_folder):
    card = (web_folder(variant).folder / "README.md").read_text()
    assert card.count("<!-- deit-port:onnx -->") == 1 and "## Parity with timm" in card
    assert f"| {QUANTIZED_FILE} | {MODEL_FILE} (onnxruntime) | 5 |" in card, card


@pytest.mark.parametrize("variant", [TINY])
def test_an_existing_onnx_folder_is_kept_without_overwrite(variant, web_folder, capsys):
    folder = web_folder(variant).folder
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert cli.main(["-q", "export-onnx", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deit-port: error: ") and "--overwrite" in err and "\n" not in err
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["m.onnx", "--no-quantize"], "for HF_DIR/onnx/"),
        (["--min-q8-agreement", "1.5"], "in [0, 1]"),
        (["--checkpoint", "w.pth"], "give MODEL"),
    ],
    ids=["out-with-folder-option", "fraction", "source-without-model"],
)
def test_export_onnx_folder_bad_input_exits_2(tmp_path, capsys, args, message):
    need_module("onnxruntime")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    argv = [a if a != "m.onnx" else str(tmp_path / a) for a in args]
    assert cli.main(["-q", "export-onnx", str(folder), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.json", "hf"]


@pytest.mark.parametrize("variant", [TINY])
def test_an_int8_model_below_the_asked_agreement_is_not_written(variant, web_folder, tmp_path):
    """`quantize_onnx(..., min_top1=1.0)`: ParityError, and no file. The batch is 16 N(0, 1)
    tensors, on which int8 changes the random-weight model's top-1 on some (measured: 14 of 16
    kept; random weights give near-flat logits: the check reports, it gates only when asked)."""
    need_module("onnxruntime")
    model = web_folder(variant).folder / "onnx" / MODEL_FILE
    x = torch.randn((16, 3, 224, 224), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "q.onnx"
    with pytest.raises(ParityError) as exc:
        quantize_onnx(model, out, x, min_top1=1.0)
    check = exc.value.report
    assert check.top1_agreement < 1.0 and "int8 check FAIL" in str(exc.value), check
    assert list(tmp_path.iterdir()) == []


# --- the trained digits model: node --------------------------------------------------------


@dataclass
class Digits:
    """The digits run converted and exported (`root/out/`), with timm's pixel values and
    logits (EMA weights, timm's eval transform) on the held-out PNGs."""

    root: Path
    pngs: list[Path]
    labels: np.ndarray
    timm_model: torch.nn.Module
    timm_pixels: torch.Tensor
    timm_logits: torch.Tensor
    names: list[str]

    @property
    def folder(self) -> Path:
        return self.root / "out"

    @property
    def pixels(self) -> Path:
        return self.root / "timm_pixels.f32"

    @property
    def resized(self) -> list[Path]:
        return [self.root / "resized" / p.name for p in self.pngs]

    def top1(self, answers: list[list[dict]]) -> np.ndarray:
        return np.array([self.names.index(a[0]["label"]) for a in answers])


@pytest.fixture(scope="session")
def digits(web_root, digits_run):
    """The digits folder: `convert` + `export-onnx HF_DIR MODEL --checkpoint --ema` (MODEL
    given: the ONNX file is compared with timm too); once per session."""
    need_module("onnxruntime")
    ex = example()
    run = digits_run()
    ckpt = ["--checkpoint", str(run.checkpoint), "--ema"]

    def build(tmp: Path) -> None:
        out = tmp / "out"
        argv = [ex.MODEL, str(out), *ckpt, "--labels", str(run.labels_file)]
        assert cli.main(["-q", "convert", *argv]) == 0
        # `HF_DIR MODEL`: the ONNX file is compared with timm too; six PNGs join the int8 check
        images = [a for p in run.pngs[:IMAGES_IN_CHECK] for a in ("--image", str(p))]
        assert cli.main(["-q", "export-onnx", str(out), ex.MODEL, *ckpt, *images]) == 0
        ema = run.timm_model(ema=True)
        transform = ex.eval_transform(ema)
        pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in run.pngs])
        write_f32(tmp / "timm_pixels.f32", pixels)
        # the PNGs resized as timm resizes them (PIL, bicubic, to the processor's shortest
        # edge): transformers.js then has nothing to resize, only to crop and normalise
        edge = json.loads((out / "preprocessor_config.json").read_text())["size"]["shortest_edge"]
        (tmp / "resized").mkdir()
        for p in run.pngs:
            image = Image.open(p).convert("RGB")
            assert image.width == image.height, p  # the digits are square: both edges are `edge`
            image.resize((edge, edge), Image.Resampling.BICUBIC).save(tmp / "resized" / p.name)

    root = build_once(web_root / "digits", build)
    ema = run.timm_model(ema=True)
    pixels = read_f32(root / "timm_pixels.f32", (len(run.pngs), 3, ex.IMG_SIZE, ex.IMG_SIZE))
    logits = model_output(ema, pixels)
    return Digits(root, run.pngs, run.test_labels, ema, pixels, logits, ex.LABELS)


@dataclass
class DigitsNode:
    """classify.mjs on the digits: fp32 `alone` (the model's logits on timm's pixel values),
    `top1[dtype, kind]` (the pipeline's top-1 on the PNGs as they are, kind "raw", and on
    `Digits.resized`, kind "resized", in "fp32" and "q8") and `pixel_values` (transformers.js's
    own, fp32, raw PNGs)."""

    digits: Digits
    alone: torch.Tensor
    top1: dict[tuple[str, str], np.ndarray]
    pixel_values: torch.Tensor


@pytest.fixture(scope="session")
def digits_node(request) -> DigitsNode:
    """Made once per session. The digits fixture is asked for after `need`, so that nothing is
    trained to be skipped."""
    need("node", "packages")
    digits = request.getfixturevalue("digits")
    shape, n = tuple(digits.timm_pixels.shape), len(digits.pngs)
    runs = {}
    for dtype in ("fp32", "q8"):

        def build(tmp: Path, dtype=dtype) -> None:
            tmp.mkdir()
            fp32 = dtype == "fp32"
            out = classify(
                digits.folder,
                dtype=dtype,
                images=digits.pngs + digits.resized,
                top_k=1,
                **({"pixels": digits.pixels, "shape": shape} if fp32 else {}),
                **({"pixel_values_out": tmp / "pixel_values.f32"} if fp32 else {}),
            )
            (tmp / "out.json").write_text(json.dumps(out))

        done = build_once(digits.root / f"node-{dtype}", build)
        runs[dtype] = json.loads((done / "out.json").read_text())
    top1 = {}
    for dtype, out in runs.items():
        answers = [entry["labels"] for entry in out["images"]]
        top1[dtype, "raw"], top1[dtype, "resized"] = (
            digits.top1(answers[:n]),
            digits.top1(answers[n:]),
        )
    pixels = read_f32(digits.root / "node-fp32" / "pixel_values.f32", (2 * n, *shape[1:]))[:n]
    alone = torch.tensor(runs["fp32"]["pixels"]["logits"])
    return DigitsNode(digits, alone, top1, pixels)


def _accuracy(top1: np.ndarray, labels: np.ndarray) -> float:
    return float((top1 == labels).mean())


@pytest.mark.slow
def test_digits_node_fp32_gives_timms_top1(digits_node, record_property):
    """Model alone (timm's pixel values): timm's top-1 on every held-out image, logits within
    1e-4. End to end (the 8 px PNGs through transformers.js's processor, which upscales them
    to 17 px with another kernel and alignment than PIL): the images whose top-1 differs from
    timm's are counted, and each is explained by the resize: timm's own model on
    transformers.js's pixel values gives transformers.js's top-1 on every image, and the same
    PNGs resized by PIL first (nothing left for transformers.js to resize) get timm's top-1
    on every image."""
    d = digits_node
    digits, n = d.digits, len(d.digits.pngs)
    timm_top1 = digits.timm_logits.argmax(-1).numpy()
    js_top1, resized_top1 = d.top1["fp32", "raw"], d.top1["fp32", "resized"]
    timm_on_js = model_output(digits.timm_model, d.pixel_values).argmax(-1).numpy()
    differ = int((js_top1 != timm_top1).sum())
    record_property(
        "measured",
        [
            (
                "transformers.js node: digits, model alone, fp32",
                "digits (trained)",
                f"same top-1 as timm on {int((d.alone.argmax(-1).numpy() == timm_top1).sum())}/{n}; "
                + _maxmean((d.alone - digits.timm_logits).abs(), MODEL_ONLY_ATOL),
            ),
            (
                "transformers.js node: digits, end to end, fp32",
                "digits (trained)",
                (
                    f"same top-1 as timm on {n - differ}/{n}; accuracy "
                    f"{_accuracy(js_top1, digits.labels):.1%} (timm "
                    f"{_accuracy(timm_top1, digits.labels):.1%}); pixel values "
                    + _maxmean((d.pixel_values - digits.timm_pixels).abs())
                ),
            ),
            (
                "transformers.js node: digits, end to end, fp32, PNGs resized by PIL",
                "digits (trained)",
                f"same top-1 as timm on {int((resized_top1 == timm_top1).sum())}/{n}",
            ),
        ],
    )
    torch.testing.assert_close(d.alone, digits.timm_logits, atol=MODEL_ONLY_ATOL, rtol=0)
    assert (resized_top1 == timm_top1).all(), "with nothing to resize, timm's top-1 everywhere"
    unexplained = np.flatnonzero(timm_on_js != js_top1)
    assert unexplained.size == 0, (
        f"{unexplained.size} of the {differ} images whose end-to-end top-1 differs from timm's "
        f"are not explained by transformers.js's pixel values, e.g. {digits.pngs[unexplained[0]]}"
    )


@pytest.mark.slow
def test_digits_node_q8_keeps_top1_and_accuracy(digits_node, record_property):
    """int8 end to end against float32 end to end: on the PNGs resized by PIL first (timm's
    pixel values, so the quantization alone: accuracy within a point of timm's too), and on
    the PNGs as they are."""
    d = digits_node
    labels, n = d.digits.labels, len(d.digits.labels)
    timm_top1 = d.digits.timm_logits.argmax(-1).numpy()
    rows, right = [], {}
    for kind in ("resized", "raw"):
        q8, fp32 = d.top1["q8", kind], d.top1["fp32", kind]
        agree = float((q8 == fp32).mean())
        right[kind] = int((q8 == labels).sum())  # counts: no float rounding at the bound
        assert agree >= MIN_Q8_AGREEMENT, f"{kind} PNGs: q8 vs fp32 top-1 agreement {agree:.1%}"
        rows.append(
            (
                f"transformers.js node: digits, end to end, q8, {kind} PNGs",
                "digits (trained)",
                (
                    f"top-1 agreement with fp32 {agree:.1%}; accuracy {right[kind] / n:.1%} "
                    f"(fp32 {_accuracy(fp32, labels):.1%}, timm {_accuracy(timm_top1, labels):.1%})"
                ),
            )
        )
    record_property("measured", rows)
    timm_right = int((timm_top1 == labels).sum())
    assert abs(right["resized"] - timm_right) <= MAX_Q8_ACCURACY_DROP * n, (
        f"q8 accuracy {right['resized'] / n:.1%}, timm's {timm_right / n:.1%}: over a point apart"
    )


@pytest.mark.slow
def test_export_onnx_image_option_joins_the_int8_check(digits):
    """`--image` six times: the int8 check ran on the synthetic image and those six, and the
    model card says so (7 inputs)."""
    card = (digits.folder / "README.md").read_text()
    assert f"| {QUANTIZED_FILE} | {MODEL_FILE} (onnxruntime) | {1 + IMAGES_IN_CHECK} |" in card
    # `HF_DIR MODEL`: model.onnx was compared with timm too
    assert f"| {MODEL_FILE} | transformers and timm (onnxruntime, batches of 1 and 5) |" in card


# --- the real browser: headless Chromium on examples/web/index.html --------------------------


@pytest.fixture(scope="session")
def browser(web_root, web_folder, request):
    """One Chromium session on the page, served from 127.0.0.1: DeiT tiny (timm's pixel values
    in fp32, q8 and the default dtype; the pipeline on its PNGs) and the first
    `BROWSER_DIGITS` held-out digits (the pipeline on the PNGs in fp32, with the pixel values;
    the model alone on timm's pixel values in fp32 and the default dtype). Once per session;
    the results are the page's own return values."""
    need("node", "packages", "chromium")
    digits = request.getfixturevalue("digits")  # after `need`: nothing trained to be skipped
    tiny = web_folder(TINY)
    site = web_root / "site"

    def build(tmp: Path) -> None:
        tmp.mkdir()
        serve_root = tmp / "root"
        serve_root.mkdir()
        (serve_root / "web").symlink_to(Path(__file__).parents[1] / "examples" / "web")
        (serve_root / "tiny").symlink_to(tiny.root)
        (serve_root / "digits").symlink_to(digits.root)
        (serve_root / "heldout").symlink_to(digits.pngs[0].parent)
        shape = list(tiny.reference["inputs"].shape)
        pngs = [f"/heldout/{p.name}" for p in digits.pngs[:BROWSER_DIGITS]]
        write_f32(serve_root / "digits.f32", digits.timm_pixels[:BROWSER_DIGITS])
        dims = list(digits.timm_pixels[:BROWSER_DIGITS].shape)
        images = [f"/tiny/images/{p.name}" for p in tiny.images]
        calls = [
            {"fn": "classifyPixels", "args": ["/tiny/out/", "fp32", "/tiny/inputs.f32", shape]},
            {"fn": "classifyPixels", "args": ["/tiny/out/", "q8", "/tiny/inputs.f32", shape]},
            {"fn": "classifyPixels", "args": ["/tiny/out/", None, "/tiny/inputs.f32", shape]},
            {
                "fn": "classifyImages",
                "args": ["/tiny/out/", "fp32", images, {"logits": True, "pixelValues": True}],
            },
            {
                "fn": "classifyImages",
                "args": ["/digits/out/", "fp32", pngs, {"topK": 1, "pixelValues": True}],
            },
            {"fn": "classifyPixels", "args": ["/digits/out/", "fp32", "/digits.f32", dims]},
            {"fn": "classifyPixels", "args": ["/digits/out/", None, "/digits.f32", dims]},
        ]
        with serve(serve_root) as base:
            results = headless(f"{base}/web/index.html", calls, tmp)
        (tmp / "results.json").write_text(json.dumps(results))
        shutil.rmtree(serve_root)

    done = build_once(site, build)
    return json.loads((done / "results.json").read_text())


@pytest.mark.slow
def test_browser_model_alone_matches_timm_in_fp32_and_runs_q8(browser, web_folder, record_property):
    expected = web_folder(TINY).reference["expected"]
    fp32, q8, default = (torch.tensor(r["logits"]) for r in browser[:3])
    diff, q8_diff = (fp32 - expected).abs(), (q8 - expected).abs()
    record_property(
        "measured",
        [
            ("transformers.js Chromium: model alone, fp32", TINY, _maxmean(diff, MODEL_ONLY_ATOL)),
            ("transformers.js Chromium: model alone, q8", TINY, _maxmean(q8_diff)),
        ],
    )
    torch.testing.assert_close(fp32, expected, atol=MODEL_ONLY_ATOL, rtol=0)
    assert torch.isfinite(q8).all() and q8.shape == fp32.shape and not torch.equal(q8, fp32)
    assert torch.equal(default, q8), "the browser's default dtype is q8 (model_quantized.onnx)"


@pytest.mark.slow
def test_browser_pipeline_on_images(browser, web_folder, record_property):
    """The page's pipeline on DeiT tiny's PNGs: the folder's labels, in logit order; the model
    accounts for none of the difference to timm (timm on the page's pixel values gives its
    logits); opaque images within `END_TO_END_ATOL`. The RGBA image is not held to it: a
    canvas stores colours premultiplied by alpha, so the page sees its fully transparent top
    third as black, where timm's `convert("RGB")` keeps the stored colour (checked: the
    crop's first row is normalised black)."""
    w = web_folder(TINY)
    result = browser[3]
    logits = torch.tensor(result["logits"])
    pixels = f32_base64(result["pixelValues"], tuple(result["dims"]))
    diff = (logits - w.reference["image_logits"]).abs().amax(-1)
    rgba = MODEL_IMAGES.index("rgba")
    opaque = [i for i in range(len(MODEL_IMAGES)) if i != rgba]
    record_property(
        "measured",
        [
            (
                "transformers.js Chromium: end to end, fp32",
                TINY,
                (
                    f"max {float(diff[opaque].max()):.3g} (bound {END_TO_END_ATOL:g}); the RGBA "
                    f"image {float(diff[rgba]):.3g} (transparent pixels drawn black)"
                ),
            ),
        ],
    )
    id2label = w.labels
    for answer, row in zip(result["labels"], logits, strict=True):
        assert [a["label"] for a in answer] == [id2label[i] for i in row.topk(5).indices.tolist()]
    torch.testing.assert_close(
        logits,
        model_output(w.timm_model, pixels),
        atol=MODEL_ONLY_ATOL,
        rtol=0,
        msg=lambda m: f"timm on the page's pixel values vs the page: {m}",
    )
    assert float(diff[opaque].max()) <= END_TO_END_ATOL, f"max |logit diff| {diff.tolist()}"
    config = json.loads((w.folder / "preprocessor_config.json").read_text())
    mean, std = (torch.tensor(config[k]).view(3, 1) for k in ("image_mean", "image_std"))
    black = (-mean / std).expand(3, pixels.shape[-1])
    torch.testing.assert_close(pixels[rgba, :, 0], black, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_browser_digits_top1(browser, digits, record_property):
    """The first `BROWSER_DIGITS` held-out digits in the page. The PNGs through the page's
    pipeline (fp32): top-1 against timm's, every exception explained by the page's own pixel
    values (timm's model on them gives the page's top-1). The model alone on timm's pixel
    values: fp32 gives timm's top-1 on every image (logits within 1e-4), and the default dtype
    (q8) keeps >= 98% of it."""
    raw, fp32, default = browser[4], browser[5], browser[6]
    n = len(raw["labels"])
    labels, timm_logits = digits.labels[:n], digits.timm_logits[:n]
    timm_top1 = timm_logits.argmax(-1).numpy()
    js_top1 = digits.top1(raw["labels"])
    pixels = f32_base64(raw["pixelValues"], tuple(raw["dims"]))
    timm_on_js = model_output(digits.timm_model, pixels).argmax(-1).numpy()
    alone, q8 = torch.tensor(fp32["logits"]), torch.tensor(default["logits"])
    alone_top1, q8_top1 = alone.argmax(-1).numpy(), q8.argmax(-1).numpy()
    agree = float((q8_top1 == alone_top1).mean())
    record_property(
        "measured",
        [
            (
                "transformers.js Chromium: digits, end to end, fp32",
                f"digits (trained), first {n}",
                (
                    f"same top-1 as timm on {int((js_top1 == timm_top1).sum())}/{n}, accuracy "
                    f"{_accuracy(js_top1, labels):.1%} (timm {_accuracy(timm_top1, labels):.1%}); "
                    "pixel values " + _maxmean((pixels - digits.timm_pixels[:n]).abs())
                ),
            ),
            (
                "transformers.js Chromium: digits, model alone",
                f"digits (trained), first {n}",
                (
                    f"fp32: same top-1 as timm on {int((alone_top1 == timm_top1).sum())}/{n}, "
                    + _maxmean((alone - timm_logits).abs(), MODEL_ONLY_ATOL)
                    + f"; q8 (the default): agreement with fp32 {agree:.1%}, accuracy "
                    f"{_accuracy(q8_top1, labels):.1%} (timm {_accuracy(timm_top1, labels):.1%})"
                ),
            ),
        ],
    )
    assert (timm_on_js == js_top1).all(), "end-to-end differences not explained by the pixels"
    torch.testing.assert_close(alone, timm_logits, atol=MODEL_ONLY_ATOL, rtol=0)
    assert agree >= MIN_Q8_AGREEMENT, f"q8 vs fp32 top-1 agreement {agree:.1%}"
