"""The model card: the converted folder's `README.md`, with hub metadata and the parity report.

The YAML front matter is what the Hugging Face hub reads (`library_name`, `pipeline_tag`,
`tags`); `license` is there but left empty for the person who publishes the weights, who
alone knows it. The body says where the weights came from and what the parity check measured:
the inputs, max and mean |diff|, top-1 agreement, the tolerance, and the library versions.

    >>> write_model_card(folder, timm_name="deit_tiny_patch16_224", spec=spec,
    ...                  source="timm pretrained weights", dtype="float32",
    ...                  report=report, inputs="1 synthetic image, 3 N(0, 1) tensors")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .arch import ArchSpec
from .hf_config import hf_class_name
from .onnx_export import OnnxReport
from .onnx_quantize import QuantizedCheck, onnx_bytes
from .parity import ParityReport
from .publish import atomic_file
from .versions import library_versions

__all__ = [
    "CARD_FILE",
    "ModelFacts",
    "onnx_section",
    "render_model_card",
    "replace_section",
    "with_section",
    "write_model_card",
]

CARD_FILE = "README.md"


def _tags(timm_name: str, spec: ArchSpec) -> list[str]:
    family = timm_name.split("_", 1)[0].split(".", 1)[0]
    tags = ["timm", "deit" if family.startswith("deit") else "vit"]
    if family == "deit3":
        tags.append("deit3")
    if spec.distilled:
        tags.append("distillation")
    tags.append("image-classification" if spec.num_classes else "image-feature-extraction")
    return tags


def _head_note(spec: ArchSpec) -> str:
    """Which of a distilled DeiT's two heads the folder kept, and what the other was."""
    if spec.cls_head_only:
        return (
            "the class-token head only (timm's `head`), which transformers fine-tunes with "
            "`labels`; the distillation-token head (`head_dist`) was dropped, so the logits are "
            "timm's `model.head(model.forward_features(x)[:, 0])`, not timm's eval output (the "
            "average of both heads), and parity is checked against that"
        )
    return (
        "both heads, averaged as timm's eval forward averages them (`cls_classifier` is "
        "timm's `head`, `distillation_classifier` its `head_dist`); for inference: this class "
        "takes no `labels` and computes no loss (convert with `--head cls` for one that does)"
    )


def _report_rows(report: ParityReport, dtype_note: str) -> list[tuple[str, str]]:
    top1 = (
        "n/a (hidden states)" if report.top1_agreement is None else f"{report.top1_agreement:.0%}"
    )
    return [
        ("compared", f"{report.output}, shape {report.shape_hf} (timm {report.shape_timm})"),
        ("max abs diff", f"{report.max_abs_diff:.3g}"),
        ("mean abs diff", f"{report.mean_abs_diff:.3g}"),
        ("top-1 agreement", top1),
        ("tolerance", f"max abs diff <= {report.atol:g}{dtype_note}"),
        ("result", "PASS" if report.passed else "FAIL"),
    ]


@dataclass(frozen=True)
class ModelFacts:
    """What the card says about the model, known before any check.

    Attributes:
        timm_name: the timm model name converted (with its tag, if any).
        spec: its architecture.
        source: where the weights came from (timm pretrained, a checkpoint file, random).
        dtype: the dtype of the written weights (`float32`, `float16`, `bfloat16`).
        labels: class names (the first few are listed).
        notes: what was read from the checkpoint or done to it (`Checkpoint.notes`).
    """

    timm_name: str
    spec: ArchSpec
    source: str
    dtype: str
    labels: Sequence[str] | None = None
    notes: Sequence[str] = ()


def render_model_card(
    facts: ModelFacts,
    *,
    report: ParityReport | None,
    inputs: str,
    exact_report: ParityReport | None = None,
) -> str:
    """The text of the model card.

    Args:
        facts: the model, its weights, its labels.
        report: the parity check of the written folder (None: not verified).
        inputs: what the parity inputs were, in words.
        exact_report: for a float16/bfloat16 folder, the float32 check of the same conversion.

    Returns:
        Markdown with YAML front matter.

    Example:
        >>> facts = ModelFacts("deit_tiny_patch16_224", spec, "timm", "float32")
        >>> render_model_card(facts, report=report, inputs="4 tensors").startswith("---")
        True
    """
    timm_name, spec, source, dtype = facts.timm_name, facts.spec, facts.source, facts.dtype
    labels, notes = facts.labels, facts.notes
    pipeline_tag = "image-classification" if spec.num_classes else "image-feature-extraction"
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    lines = [
        *_front_matter(timm_name, spec, pipeline_tag),
        *_description(timm_name, spec, source, dtype, labels, notes),
        *_usage(spec, pipeline_tag),
        *_parity(report, exact_report, dtype, inputs),
        "",
        f"Versions: {versions}.",
        "",
    ]
    return "\n".join(lines)


def _front_matter(timm_name: str, spec: ArchSpec, pipeline_tag: str) -> list[str]:
    """The YAML the hub reads."""
    return [
        "---",
        "# license: the license of the weights you publish; deit_port cannot know it",
        "# (timm's and facebookresearch/deit's DeiT weights are apache-2.0).",
        "license:",
        "library_name: transformers",
        f"pipeline_tag: {pipeline_tag}",
        "tags:",
        *(f"- {t}" for t in _tags(timm_name, spec)),
        "---",
        "",
    ]


def _description(
    timm_name: str,
    spec: ArchSpec,
    source: str,
    dtype: str,
    labels: Sequence[str] | None,
    notes: Sequence[str],
) -> list[str]:
    """What was converted, from which weights, into which class."""
    lines = [
        f"# {timm_name}",
        "",
        (
            f"The timm model `{timm_name}`, converted to transformers' "
            f"`{hf_class_name(spec)}` by deit_port."
        ),
        "",
        f"- weights: {source}",
        f"- weights dtype: {dtype}",
        f"- architecture: embed dim {spec.embed_dim}, depth {spec.depth}, {spec.num_heads} heads, "
        f"patch {spec.patch_size}, image size {spec.img_size}, "
        f"{spec.num_classes or 'no'} classes" + (", distilled" if spec.distilled else ""),
    ]
    lines += [f"- {note}" for note in notes]
    if spec.distilled and spec.num_classes:
        lines.append(f"- head: {_head_note(spec)}")
    if labels:
        shown = ", ".join(f"`{name}`" for name in list(labels)[:5])
        lines.append(f"- labels: {shown}" + (", ..." if len(labels) > 5 else ""))
    return lines


def _usage(spec: ArchSpec, pipeline_tag: str) -> list[str]:
    """How to run it, and at which size."""
    return [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'classifier = pipeline("{pipeline_tag}", model="path/to/this/folder")',
        'classifier("image.jpg")',
        "```",
        "",
        (
            f"Run it at {spec.img_size} px, the size it was converted at (its image processor "
            "resizes to that). transformers' `interpolate_pos_encoding=True` does not compute what "
            "timm computes at another size: it resamples the position embedding with plain "
            "bicubic, timm with antialiased bicubic (measured on random weights: max |logit diff| "
            "2e-3 to 4e-2; deit_port's docs/finetune.md). For another size, convert at the size "
            "you run at (`deit-port convert ... --img-size S`)."
        ),
        "",
    ]


def _parity(
    report: ParityReport | None, exact_report: ParityReport | None, dtype: str, inputs: str
) -> list[str]:
    """The parity check of the written folder (and of the float32 conversion before a cast)."""
    lines = ["## Parity with timm", ""]
    if report is None:
        return [*lines, "Not checked: the conversion was run without verification."]
    note = "" if dtype == "float32" else f" ({dtype} weights, loaded as float32)"
    lines += [
        (
            "The written folder, loaded with `from_pretrained`, against the timm model in "
            f"float32, on {inputs}."
        ),
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in _report_rows(report, note)),
    ]
    if exact_report is not None:
        verdict = "PASS" if exact_report.passed else "FAIL"
        lines += [
            "",
            (
                f"Before the cast to {dtype}, the float32 conversion: max abs diff "
                f"{exact_report.max_abs_diff:.3g}, mean abs diff "
                f"{exact_report.mean_abs_diff:.3g} (tolerance {exact_report.atol:g}, {verdict})."
            ),
        ]
    return lines


def write_model_card(folder: str | os.PathLike, facts: ModelFacts, **kwargs) -> Path:
    """Write `README.md` into `folder` (keywords as `render_model_card`); returns its path."""
    path = Path(folder) / CARD_FILE
    path.write_text(render_model_card(facts, **kwargs), encoding="utf-8")
    return path


def with_section(card: str, name: str, body: str) -> str:
    """`card` with the section `name` (between `<!-- deit-port:NAME -->` markers) set to
    `body`: replaced where it is, else appended. Another tool's sections (`export-onnx`'s
    ONNX figures) are added to the converter's card this way, and a rerun replaces its own.

    Example:
        >>> with_section("# m\n", "onnx", "## ONNX")
        '# m\n\n<!-- deit-port:onnx -->\n## ONNX\n<!-- /deit-port:onnx -->\n'
    """
    start, end = f"<!-- deit-port:{name} -->", f"<!-- /deit-port:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    before, found, rest = card.partition(start)
    if found and end in rest:
        return before + block + rest.split(end, 1)[1]
    return (card.rstrip("\n") + "\n\n" if card.strip() else "") + block + "\n"


def replace_section(folder: str | os.PathLike, name: str, body: str) -> None:
    """Give the model card in `folder` the section `name` (`with_section`), rewritten
    atomically; a folder without a card gets one holding that section alone."""
    card = Path(folder) / CARD_FILE
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    with atomic_file(card, overwrite=True) as tmp:
        tmp.write_text(with_section(text, name, body), encoding="utf-8")


def onnx_section(folder: Path, fp32: OnnxReport, q: QuantizedCheck | None) -> str:
    """The model card's ONNX section (`export_onnx_folder`'s): the files in `folder`, what each
    was compared with, the figures."""
    ort = fp32.runtime_checks
    refs = " and ".join(dict.fromkeys(c.reference for c in ort))
    worst = max(ort, key=lambda c: c.report.max_abs_diff).report
    batches = " and ".join(str(b) for b in dict.fromkeys(c.batch for c in ort))
    model_file, where = fp32.output.name, folder.name
    files = (
        f"`{where}/{model_file}` (float32, "
        f"{onnx_bytes(fp32.output) / 1e6:.1f} MB, opset {fp32.opset}, input "
        f"`pixel_values` with a dynamic batch, output `{fp32.output_name}`)"
    )
    if q is not None:
        files += (
            f" and `{where}/{q.output.name}` (int8: onnxruntime's dynamic quantization, "
            f"{q.weight_type} weights, {q.size_bytes / 1e6:.1f} MB)"
        )
    fp32_row = (
        f"| {model_file} | {refs} (onnxruntime, batches of {batches}) | {max(c.batch for c in ort)} | "
        f"{worst.max_abs_diff:.3g} (atol {worst.atol:g}) | {worst.mean_abs_diff:.3g} | "
        f"{_percent(worst.top1_agreement)} |"
    )
    lines = [
        "## ONNX (transformers.js, onnxruntime)",
        "",
        (
            f"Written by `deit-port export-onnx`: {files}. transformers.js reads them from this "
            "folder: `dtype: 'fp32'` the first, `dtype: 'q8'` (its default in the browser) the second."
        ),
        "",
        "| file | compared with | inputs | max abs diff | mean abs diff | top-1 agreement |",
        "|---|---|---|---|---|---|",
        fp32_row,
    ]
    if q is not None:
        lines += [
            (
                f"| {q.output.name} | {q.reference} (onnxruntime) | {q.inputs} | "
                f"{q.max_abs_diff:.3g} | {q.mean_abs_diff:.3g} | {_percent(q.top1_agreement)} |"
            ),
            "",
            (
                "The int8 file is compared on a synthetic image (and the images given with "
                "`--image`) through this folder's image processor, then N(0, 1) tensors: int8 "
                "weights change the logits by design, so these figures are a measurement, not a "
                "parity bound."
            ),
        ]
    lines += [
        "",
        "```js",
        "import { env, pipeline } from '@huggingface/transformers';",
        "env.allowRemoteModels = false;",
        "env.localModelPath = '/path/to/the/parent/folder/';",
        "const classify = await pipeline('image-classification', 'this-folder', { dtype: 'fp32' });",
        "console.log(await classify('image.png'));",
        "```",
    ]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a (hidden states)" if value is None else f"{value:.1%}"
