// Classify with a deit-port folder in node, through transformers.js, from local files only.
//
//   node classify.mjs MODEL_DIR [--dtype fp32|q8] [--top-k K] [--logits] [IMAGE ...]
//        [--pixel-values-out FILE.f32] [--pixels FILE.f32 --shape N,C,H,W] [--threads N]
//
// MODEL_DIR is a folder written by `deit-port convert` then `deit-port export-onnx MODEL_DIR`
// (config.json, preprocessor_config.json, onnx/model.onnx, onnx/model_quantized.onnx).
// Prints one JSON object:
//   images: per IMAGE, `pipeline('image-classification', MODEL_DIR)`'s answer (labels and
//           scores, top K; the images go as one batch); with --logits, also the logits of the
//           image through the folder's image processor and the model;
//   pixels: with --pixels, the model alone on those pixel values (raw little-endian float32
//           of shape --shape, e.g. timm's preprocessed batch): its logits.
// --pixel-values-out writes the image processor's pixel values (float32, the images in order).
import fs from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";

import {
  RawImage,
  Tensor,
  env,
  pipeline,
} from "@huggingface/transformers";

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    dtype: { type: "string", default: "fp32" },
    "top-k": { type: "string", default: "5" },
    pixels: { type: "string" },
    shape: { type: "string" },
    "pixel-values-out": { type: "string" },
    logits: { type: "boolean", default: false },
    threads: { type: "string" },
  },
});
const [modelDir, ...images] = positionals;
if (!modelDir) {
  console.error("usage: node classify.mjs MODEL_DIR [--dtype fp32|q8] [IMAGE ...] [--pixels F --shape N,C,H,W]");
  process.exit(2);
}
if (Boolean(opts.pixels) !== Boolean(opts.shape)) {
  console.error("classify.mjs: --pixels and --shape go together");
  process.exit(2);
}

// Local files only: the folder's parent is the model path, its name the model id.
const folder = path.resolve(modelDir);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(folder) + path.sep;
const modelId = path.basename(folder);
const options = { dtype: opts.dtype, device: "cpu" };
if (opts.threads) options.session_options = { intraOpNumThreads: Number(opts.threads) };

const result = { model: folder, dtype: opts.dtype, images: [], pixels: null };
const classifier = await pipeline("image-classification", modelId, options);
if (opts.pixels) {
  const dims = opts.shape.split(",").map(Number);
  const bytes = fs.readFileSync(opts.pixels);
  const data = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
  const { logits } = await classifier.model({ pixel_values: new Tensor("float32", data, dims) });
  result.pixels = { dims: logits.dims, logits: logits.tolist() };
}
if (images.length) {
  const raw = await Promise.all(images.map((file) => RawImage.read(file)));
  const labels = await classifier(raw, { top_k: Number(opts["top-k"]) }); // one batch
  result.images = images.map((file, i) => ({ file, labels: labels[i] }));
  if (opts.logits || opts["pixel-values-out"]) {
    // what the pipeline computed on the way: the folder's image processor, then the model
    const { pixel_values } = await classifier.processor(raw);
    if (opts["pixel-values-out"]) fs.writeFileSync(opts["pixel-values-out"], pixel_values.data);
    if (opts.logits) {
      const rows = (await classifier.model({ pixel_values })).logits.tolist();
      result.images.forEach((entry, i) => (entry.logits = rows[i]));
    }
  }
}
process.stdout.write(JSON.stringify(result) + "\n");
