"""Running transformers.js from the tests: in node (examples/web/classify.mjs) and in headless
Chromium (examples/web/index.html driven by examples/web/headless.mjs), on folders the tests
serve from 127.0.0.1.

What they need is installed by CI (.ci/run): Node.js, `npm ci --ignore-scripts` in examples/web
(the pinned @huggingface/transformers, which brings onnxruntime-node and onnxruntime-web, and
puppeteer-core), Debian's chromium. Locally a test that lacks one skips with a one-line reason;
under `CI=true` it fails instead (`need`).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
import typing
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .util import skip_or_fail

WEB = Path(__file__).parents[1] / "examples" / "web"
PACKAGES = {"@huggingface/transformers": "4.3.1", "puppeteer-core": "24.43.1"}  # package.json
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NODE_TIMEOUT_S = 300  # one node or browser run; each is seconds to a minute here
SERVER_TIMEOUT_S = 60  # a request the page does not finish in this long is dropped

__all__ = [
    "CHROMIUM",
    "WEB",
    "classify",
    "f32_base64",
    "headless",
    "need",
    "read_f32",
    "serve",
    "write_browser_table",
    "write_f32",
]


def need(*what: str) -> None:
    """Skip (fail under `CI=true`) unless each of `what` is here: "node", "packages",
    "chromium"."""
    for item in what:
        reason = _missing(item)
        if reason is None:
            continue
        skip_or_fail(f"transformers.js tests: {reason}")


@functools.cache
def _missing(item: str) -> str | None:
    if item == "node":  # sharp, transformers.js's image reader in node, needs 20.9
        if not shutil.which("node"):
            return "node not found: install Node.js (>= 20.9)"
        version = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
        version = version.stdout.strip()
        major, minor = (int(v) for v in version.lstrip("v").split(".")[:2])
        return None if (major, minor) >= (20, 9) else f"node {version} < 20.9: install Node.js 20"
    if item == "packages":
        for name, version in PACKAGES.items():
            manifest = WEB / "node_modules" / name / "package.json"
            found = json.loads(manifest.read_text())["version"] if manifest.is_file() else None
            if found != version:
                return (
                    f"{name} {version} not in examples/web/node_modules (found {found}): run "
                    "`npm ci --ignore-scripts` in examples/web"
                )
        return None
    if item == "chromium":
        if os.access(CHROMIUM, os.X_OK):
            return None
        return f"{CHROMIUM} not found: `apt-get install chromium` (or set CHROMIUM)"
    raise ValueError(item)


def write_f32(path: Path, x: torch.Tensor) -> Path:
    """`x` as raw little-endian float32 (what classify.mjs's --pixels and the page read)."""
    path.write_bytes(x.detach().float().contiguous().numpy().astype("<f4").tobytes())
    return path


def read_f32(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype="<f4").reshape(shape).copy())


def f32_base64(text: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The page's base64 float32 (classifyImages' `pixelValues`) as a tensor."""
    data = np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(shape)
    return torch.from_numpy(data.copy())


def _threads() -> str:
    """The onnxruntime threads a node run may use: the worker's share (tests/suite_speed.py)."""
    return os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1)


def _run_node(args: list[str], cwd: Path | None = None) -> dict:
    proc = subprocess.run(
        ["node", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, (
        f"node {' '.join(args[:2])} exited {proc.returncode}:\n{proc.stderr}"
    )
    return json.loads(proc.stdout)


def classify(
    folder: Path,
    *,
    dtype: str = "fp32",
    images: list[Path] = (),
    pixels: Path | None = None,
    shape: tuple[int, ...] | None = None,
    logits: bool = False,
    pixel_values_out: Path | None = None,
    top_k: int = 5,
) -> dict:
    """examples/web/classify.mjs on `folder`: its JSON (`images`, `pixels`)."""
    args = [str(WEB / "classify.mjs"), str(folder), "--dtype", dtype, "--top-k", str(top_k)]
    args += ["--threads", _threads(), *map(str, images)]
    if pixels is not None:
        args += ["--pixels", str(pixels), "--shape", ",".join(map(str, shape))]
    if logits:
        args.append("--logits")
    if pixel_values_out is not None:
        args += ["--pixel-values-out", str(pixel_values_out)]
    return _run_node(args)


def run_module(source: str, cwd: Path) -> dict:
    """A node ES module (text) run in `cwd`; `@huggingface/transformers` is importable by that
    name (resolved in examples/web/node_modules); it prints one JSON value."""
    script = cwd / ".deit_port_test.mjs"
    entry = WEB / "node_modules" / "@huggingface" / "transformers" / "dist"
    script.write_text(
        source.replace(
            "'@huggingface/transformers'", f"'{(entry / 'transformers.node.mjs').as_uri()}'"
        )
    )
    try:
        return _run_node([str(script)], cwd=cwd)
    finally:
        script.unlink()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map: typing.ClassVar[dict[str, str]] = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".mjs": "text/javascript",
        ".js": "text/javascript",
        ".wasm": "application/wasm",
    }
    timeout = SERVER_TIMEOUT_S

    def log_message(self, format, *args) -> None:
        pass


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve `root` (symbolic links followed) on 127.0.0.1, on a free port, for the block;
    yields the base URL. Threads are daemons; the server is shut down when the block ends."""
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def headless(page_url: str, calls: list[dict], work: Path) -> list:
    """examples/web/headless.mjs: open `page_url` in headless Chromium, call the page's
    functions (`[{"fn": ..., "args": [...]}]`) in order, return their results."""
    calls_file = work / "calls.json"
    calls_file.write_text(json.dumps(calls))
    timeout_ms = str(1000 * (NODE_TIMEOUT_S - 30))
    args = [str(WEB / "headless.mjs"), page_url, str(calls_file), "--chromium", CHROMIUM]
    return _run_node([*args, "--timeout-ms", timeout_ms])["results"]


NOTES = """
## What the rows are

- **Model alone**: timm's preprocessed pixel values (the parity inputs: a synthetic image
  through timm's eval transform, then N(0, 1) tensors; on the digits, the held-out PNGs through
  timm's eval transform) fed to the folder's model by transformers.js: onnxruntime-node in
  node, onnxruntime-web (WASM) in Chromium. Bound 1e-4, as for onnxruntime in Python.
- **End to end**: transformers.js's own image processor reads the folder's
  `preprocessor_config.json` (resize the shortest edge, center crop, rescale, normalise) but
  resizes its own way: in node with sharp's `affine` and a bicubic interpolator (no
  antialiasing when shrinking, the pixel grid anchored at the corner), in Chromium with a
  canvas `drawImage`. Neither is PIL's bicubic (timm's), so the pixel values differ and the
  logits move with them. The bound, 0.3 on the 224 px variants' test images (80x100 to
  320x240 px; the variants at depth 2 with seeded random weights, as tests/test_onnx.py
  exports them), is there to catch a wrong processor setting (a crop,
  mean/std or channel order off moves logits by 1 and more), not the kernel. Each case also
  checks that the model accounts for none of the difference: timm's model on
  transformers.js's own pixel values gives transformers.js's logits within 1e-4.
- **Transparency** (Chromium): a canvas keeps colours premultiplied by alpha, so fully
  transparent pixels are read as black, where timm's `convert("RGB")` keeps the stored colour
  (the RGBA test image: its top third). Flatten such images first if that matters.
- **The digits** (`examples/train_convert_pipeline.py`: 8x8 images, the model at 16 px; all
  450 held-out images in node, the first 100 in Chromium): transformers.js upscales them to
  17 px its own way, and on images this small the pixel values differ far more than on
  photos; the top-1 follows on many images. Each such image is explained by the resize:
  timm's model on transformers.js's pixel values gives transformers.js's top-1 on every
  image, and in node the same PNGs resized by PIL first (bicubic, to the processor's shortest
  edge: transformers.js then only crops) get timm's top-1 on every image. So resize small
  images yourself, as timm does, before handing them over. In Chromium that is not enough
  here: where the resized edge minus the crop is odd (17 - 16), the browser build crops with
  a canvas at a half-pixel offset, which interpolates (node's sharp and timm take whole
  pixels).
- **int8** (`dtype: 'q8'`, `onnx/model_quantized.onnx`: onnxruntime's dynamic quantization,
  uint8 weights per tensor, as transformers.js makes its own `q8` files for a model with a
  `Conv`: onnxruntime-web has no `ConvInteger` for int8 weights): end to end against fp32 on
  the same PNGs; on the PNGs resized by PIL first (timm's pixel values: the quantization
  alone) its accuracy against timm's too. The browser's default dtype is `q8`, node's (CPU)
  `fp32`.
"""


def write_browser_table(path: Path, measured: list[tuple], args) -> None:
    """docs/browser.md: what tests/test_browser.py recorded (`record_property("measured")`
    rows whose first field starts with "transformers.js"), with the command that wrote it."""
    rows = sorted(row for row in measured if row[0].startswith("transformers.js"))
    # where the run kept its files and what it printed change nothing measured
    args = [a for a in args if not a.startswith(("--basetemp", "--durations"))]
    versions = ", ".join(f"{name} {version}" for name, version in PACKAGES.items())
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    chromium = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, check=False)
    lines = [
        "# In the browser: transformers.js on converted folders, measured",
        "",
        "Written by the test run that measured it (do not edit by hand):",
        "",
        "```sh",
        f"pytest {' '.join(args)}",
        "```",
        "",
        (
            f"node {node.stdout.strip()}, {chromium.stdout.strip()}, {versions} "
            "(onnxruntime-node in node, onnxruntime-web's WASM in Chromium). What each row is, "
            "and why its bound is what it is: tests/test_browser.py, and the notes below."
        ),
        "",
        "| measured | case | value |",
        "|---|---|---|",
        *(f"| {what} | {case} | {value} |" for what, case, value in rows),
        "",
    ]
    lines += [NOTES.strip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
