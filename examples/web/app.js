// Classify images in the browser with a deit-port folder: transformers.js's browser build and
// onnxruntime-web's WASM files, both served from this folder's node_modules (no CDN).
//
// The folder is what `deit-port convert` then `deit-port export-onnx HF_DIR` write: config.json,
// preprocessor_config.json, onnx/model.onnx (dtype 'fp32'), onnx/model_quantized.onnx
// (dtype 'q8', transformers.js's default in the browser). index.html is the page; the same
// functions are on `window.deitPort` for scripts (examples/web/headless.mjs calls them).
import {
  RawImage,
  Tensor,
  env,
  pipeline,
} from "./node_modules/@huggingface/transformers/dist/transformers.js";

env.allowLocalModels = true; // off by default in browsers
env.allowRemoteModels = false; // never the hub: only the folder this server serves
env.useBrowserCache = false; // a re-exported folder is read again, not a cached copy
env.backends.onnx.wasm.wasmPaths = new URL("./node_modules/onnxruntime-web/dist/", import.meta.url).href;

const loaded = new Map();

/**
 * A folder URL on this server (relative to the page, or from the root) as transformers.js's
 * model path + id. The path is given without the origin: transformers.js takes a full
 * `http://` path for a remote file, and would not look for the folder's optional files there.
 */
function locate(model) {
  const url = new URL(model.endsWith("/") ? model : `${model}/`, location.href);
  if (url.origin !== location.origin) throw new Error(`${model}: serve the model from this page's server`);
  const id = url.pathname.split("/").filter(Boolean).pop();
  return { base: new URL("..", url).pathname, id };
}

/** The pipeline for (model, dtype), loaded once: its `.model` and `.processor` are used too. */
async function load(model, dtype) {
  const key = `${model}\u0000${dtype}`;
  if (!loaded.has(key)) {
    const { base, id } = locate(model);
    env.localModelPath = base;
    loaded.set(key, pipeline("image-classification", id, { dtype, device: "wasm" }));
  }
  return loaded.get(key);
}

/**
 * Classify images (URLs, Blobs or Files) with `pipeline('image-classification', folder)`, as
 * one batch: its top-k labels per image. With `logits`, also the logits of the images through
 * the folder's image processor and model (what the pipeline computes on the way); with
 * `pixelValues`, the processor's pixel values (little-endian float32, base64).
 * @returns {Promise<{labels: {label: string, score: number}[][], dims?: number[], logits?: number[][], pixelValues?: string}>}
 */
export async function classifyImages(model, dtype, images, { topK = 5, logits = false, pixelValues = false } = {}) {
  const classifier = await load(model, dtype);
  const raw = await Promise.all(images.map((image) => RawImage.read(image)));
  const result = { labels: await classifier(raw, { top_k: topK }) };
  if (logits || pixelValues) {
    const { pixel_values } = await classifier.processor(raw);
    result.dims = pixel_values.dims;
    if (pixelValues) result.pixelValues = base64(pixel_values.data);
    if (logits) result.logits = (await classifier.model({ pixel_values })).logits.tolist();
  }
  return result;
}

function base64(floats) {
  const bytes = new Uint8Array(floats.buffer, floats.byteOffset, floats.byteLength);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

/**
 * The model alone on pixel values that are already preprocessed (e.g. timm's): raw
 * little-endian float32 fetched from `url`, of shape `dims` (N, C, H, W).
 */
export async function classifyPixels(model, dtype, url, dims) {
  const classifier = await load(model, dtype);
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  const data = new Float32Array(await response.arrayBuffer());
  const { logits } = await classifier.model({ pixel_values: new Tensor("float32", data, dims) });
  return { dims: logits.dims, logits: logits.tolist() };
}

// --- the page -------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function show(results, names) {
  const rows = results.labels.map((top, i) => {
    const cells = top.map((t) => `${t.label} (${(100 * t.score).toFixed(1)}%)`).join(", ");
    return `<tr><td>${names[i]}</td><td>${cells}</td></tr>`;
  });
  $("results").innerHTML = `<tr><th>image</th><th>top labels</th></tr>${rows.join("")}`;
  $("output").textContent = JSON.stringify(results); // for `chromium --dump-dom` readers
}

async function run(images, names) {
  const model = $("model").value;
  const dtype = $("dtype").value;
  $("status").textContent = `classifying ${images.length} image(s) with ${model} (${dtype})...`;
  try {
    show(await classifyImages(model, dtype, images, { logits: true }), names);
    $("status").textContent = `done: ${model} (${dtype})`;
  } catch (error) {
    $("status").textContent = `error: ${error.message ?? error}`;
    throw error;
  }
}

const params = new URLSearchParams(location.search);
if (params.has("model")) $("model").value = params.get("model");
if (params.has("dtype")) $("dtype").value = params.get("dtype");
$("files").addEventListener("change", (event) => {
  const files = [...event.target.files];
  if (files.length) run(files, files.map((f) => f.name));
});
window.deitPort = { classifyImages, classifyPixels, env };
$("status").textContent = "ready: choose images";
const urls = params.getAll("image"); // ?image=a.png&image=b.png classifies on load
if (urls.length) run(urls, urls);
