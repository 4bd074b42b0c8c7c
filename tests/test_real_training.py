"""A real training run, end to end: timm trains a registered DeiT on real images, deit-port
converts the checkpoint with no shape flags, and transformers' `pipeline` classifies the held-out
images, written as PNG files, exactly as timm's eval transform + model does.

The data are scikit-learn's bundled digits (1,797 real 8x8 images in the wheel; nothing is
downloaded). The training recipe is `examples/train_convert_pipeline.py`'s (timm's
`create_model`, `create_optimizer_v2`, `ModelEmaV3`; fixed epochs and seeds); what is checked
here is written out independently of it: timm's eval path as a user runs it, the command line,
and the pipeline.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from deit_port import cli
from deit_port.preprocess import load_image_processor

from .digits import example
from .util import ATOL_MEASURED, TINY

MIN_ACCURACY = 0.5  # 10 classes: chance is 10%


@pytest.mark.slow
@pytest.mark.parametrize("variant", [TINY])
def test_trained_on_digits_converted_and_classified_by_the_pipeline(
    tmp_path, record_property, variant, digits_run
):
    """The training (and its checkpoint, labels, held-out PNGs) is the session's `digits_run`
    (tests/digits.py), shared with tests/test_browser.py; the rest is done here."""
    from timm.data import create_transform, resolve_data_config
    from transformers import pipeline

    ex = example()
    assert ex.MODEL == variant
    run = digits_run()
    ckpt, labels, paths, test_labels = run.checkpoint, run.labels_file, run.pngs, run.test_labels
    ema, model = run.timm_model(ema=True), run.timm_model(ema=False)

    out = tmp_path / "deit-digits-hf"
    argv = [variant, str(out), "--checkpoint", str(ckpt), "--ema", "--labels", str(labels)]
    assert cli.main(["-q", "convert", *argv]) == 0
    assert "entry 'state_dict_ema' (EMA)" in (out / "README.md").read_text()

    pngs = [Image.open(p) for p in paths]
    # timm, as a user evaluates the EMA model: PNG -> RGB -> timm's eval transform at 16 px
    transform = create_transform(**resolve_data_config({"img_size": 16}, model=ema))
    with torch.inference_mode():
        timm_logits = ema.eval()(torch.stack([transform(img.convert("RGB")) for img in pngs]))
    timm_top1 = timm_logits.argmax(-1).numpy()

    classifier = pipeline("image-classification", model=str(out))
    answers = classifier([str(p) for p in paths], top_k=1)
    label2id = classifier.model.config.label2id
    hf_top1 = np.array([label2id[a[0]["label"]] for a in answers])
    # the logits behind those answers: the pipeline's own image processor and model
    with torch.inference_mode():
        pixels = classifier.image_processor(pngs, return_tensors="pt")["pixel_values"]
        hf_logits = classifier.model(pixel_values=pixels).logits
    diff = (hf_logits - timm_logits).abs()
    # transformers 5's pipeline resizes with torchvision (its default backend), one or two uint8
    # levels off PIL's bicubic; the same folder's processor on the PIL backend is timm's exactly
    with torch.inference_mode():
        pil_pixels = load_image_processor(out, "pil")(pngs, return_tensors="pt")["pixel_values"]
        pil_diff = (classifier.model(pixel_values=pil_pixels).logits - timm_logits).abs()

    timm_accuracy = float((timm_top1 == test_labels).mean())
    hf_accuracy = float((hf_top1 == test_labels).mean())
    with torch.inference_mode():
        plain_accuracy = float(
            (
                model.eval()(torch.stack([transform(i.convert("RGB")) for i in pngs]))
                .argmax(-1)
                .numpy()
                == test_labels
            ).mean()
        )
    measured = {
        "held_out_images": len(paths),
        "timm_accuracy_ema": timm_accuracy,
        "timm_accuracy_plain": plain_accuracy,
        "pipeline_accuracy": hf_accuracy,
        "same_top1": int((hf_top1 == timm_top1).sum()),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "pipeline_processor": type(classifier.image_processor).__name__,
        "max_abs_logit_diff_pil_backend": float(pil_diff.max()),
        "max_abs_logit": float(timm_logits.abs().max()),
        "train_seconds_noisy": run.train_seconds,
    }
    for key, value in measured.items():
        record_property(key, value)
    print("measured:", measured)

    differ = np.flatnonzero(hf_top1 != timm_top1)
    assert differ.size == 0, (
        f"the pipeline's top-1 differs from timm's on {differ.size} images, e.g. {paths[differ[0]]}"
    )
    assert hf_accuracy == timm_accuracy
    assert float(pil_diff.max()) <= ATOL_MEASURED, f"PIL backend: max |diff| {pil_diff.max():.3g}"
    assert timm_accuracy >= MIN_ACCURACY, (
        f"held-out accuracy {timm_accuracy:.1%} < {MIN_ACCURACY:.0%}"
    )
