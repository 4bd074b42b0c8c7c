"""`--labels`: the label files read, refused, and written into the config."""

import json

import pytest

from deit_port import cli
from deit_port.errors import CheckpointError
from deit_port.labels import read_labels

from .util import TINY, random_timm_model, save_checkpoint, state_dict_copy


@pytest.fixture(scope="module")
def tiny():
    return random_timm_model(TINY, seed=3)


# --- --labels ------------------------------------------------------------------------------

LABELS = ["cat", "dog", "wombat"]


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("json-list", json.dumps(LABELS)),
        ("json-id2label", json.dumps({"2": "wombat", "0": "cat", "1": "dog"})),
        ("json-label2id", json.dumps({"dog": 1, "wombat": 2, "cat": 0})),
        ("lines", "cat\ndog\nwombat\n"),
    ],
)
def test_read_labels(tmp_path, fmt, text):
    path = tmp_path / "labels"
    path.write_text(text)
    assert read_labels(path) == LABELS


@pytest.mark.parametrize(
    "text", ["cat\n\ndog\n", "cat\ncat\n", '{"0": "cat", "2": "dog"}', "[1, 2]", "[", ""]
)
def test_read_labels_refuses_bad_files(tmp_path, text):
    path = tmp_path / "labels"
    path.write_text(text)
    with pytest.raises(CheckpointError, match=str(path)):
        read_labels(path)


def test_labels_file_names_the_classes(tiny, tmp_path):
    model = random_timm_model(TINY, seed=8, num_classes=3)
    ckpt = save_checkpoint(state_dict_copy(model), tmp_path / "finetune.safetensors", "safetensors")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    out = tmp_path / "out"
    argv = [
        "convert",
        TINY,
        str(out),
        "--checkpoint",
        str(ckpt),
        "--num-classes",
        "3",
        "--labels",
        str(labels),
        "-q",
    ]
    assert cli.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "wombat"}
    assert config["label2id"] == {"cat": 0, "dog": 1, "wombat": 2}
