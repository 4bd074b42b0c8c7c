"""Class names: a user's labels file, or ImageNet-1k's names from timm."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import LabelsError, first_line, not_a_regular_file

__all__ = ["imagenet_labels", "read_labels"]


def imagenet_labels() -> list[str]:
    """ImageNet-1k class names in index order, from timm's bundled `ImageNetInfo`.

    A few descriptions occur twice (`crane`, `maillot`); those get their WordNet id appended
    (`crane (n02012849)`) so that `label2id` stays one to one.
    """
    from collections import Counter

    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in range(info.num_classes())]
    twice = {n for n, c in Counter(names).items() if c > 1}
    return [
        f"{n} ({info.index_to_label_name(i)})" if n in twice else n for i, n in enumerate(names)
    ]


def read_labels(path: str | os.PathLike) -> list[str]:
    """Read class names: a JSON list, a JSON `{index: name}` (or `{name: index}`) object, or a
    text file with one name a line.

    Returns:
        The names in class-index order (their count is checked against the model later).

    Raises:
        LabelsError (a CheckpointError): not a regular file (a FIFO, a device: never opened),
            unreadable, empty, gaps in the indices, blank or duplicate names.

    Example:
        >>> read_labels("labels.txt")[:2]
        ['cat', 'dog']
    """
    path = Path(path)
    what = not_a_regular_file(path)
    if what:  # a FIFO would be waited on, /dev/zero read forever
        raise LabelsError(f"labels file {path} is {what}: give the path of a text or JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LabelsError(f"cannot read labels file {path}: {first_line(e)}") from e
    if text.lstrip().startswith(("[", "{")):
        try:
            labels = _labels_from_json(json.loads(text), path)
        except json.JSONDecodeError as e:
            raise LabelsError(f"labels file {path} is not valid JSON: {e}") from e
    else:
        labels = text.rstrip("\n\r\t ").splitlines()
        for i, line in enumerate(labels, 1):
            if not line.strip():
                raise LabelsError(f"labels file {path}: line {i} is empty; one name a line")
        labels = [line.strip() for line in labels]
    if not labels or labels == [""]:
        raise LabelsError(f"labels file {path} holds no labels")
    seen = set()
    for label in labels:
        if label in seen:
            raise LabelsError(f"labels file {path}: {label!r} occurs twice; names must be unique")
        seen.add(label)
    return labels


def _labels_from_json(obj, path: Path) -> list[str]:
    if isinstance(obj, list):
        if not all(isinstance(x, str) and x.strip() for x in obj):
            raise LabelsError(f"labels file {path}: every label must be a non-empty string")
        return list(obj)
    if isinstance(obj, dict):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in obj.values()):
            pairs = {v: k for k, v in obj.items()}  # {name: index}
        elif all(re.fullmatch(r"\d+", str(k)) for k in obj):
            pairs = {int(k): v for k, v in obj.items()}  # {index: name}
        else:
            raise LabelsError(
                f"labels file {path}: a JSON object must map indices to names or names to indices"
            )
        if sorted(pairs) != list(range(len(pairs))):
            raise LabelsError(f"labels file {path}: the indices must be 0..{len(pairs) - 1}")
        return _labels_from_json([pairs[i] for i in range(len(pairs))], path)
    raise LabelsError(f"labels file {path}: expected a JSON list or object of labels")
