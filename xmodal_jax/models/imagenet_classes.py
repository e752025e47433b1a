"""ImageNet-1k (ILSVRC-2012) class names, in the standard class-index order.

Source of `imagenet_classes.txt`: timm 1.0.31 (PyPI), `timm/data/_info/imagenet_synsets.txt`
(the 1000 WordNet synset ids in index order) joined with `imagenet_synset_to_lemma.txt` (their
WordNet lemmas). Each line holds the comma-separated lemmas of one class, e.g.
`tabby, tabby cat`; `names()` gives the first lemma ('tabby'), `lemmas()` all of them.
"""

from __future__ import annotations

import functools
import os

_FILE = os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")


@functools.cache
def lemmas() -> tuple[tuple[str, ...], ...]:
    """The WordNet lemmas of each of the 1000 classes."""
    with open(_FILE, encoding="utf-8") as f:
        rows = [tuple(s.strip() for s in line.split(",")) for line in f.read().splitlines()]
    assert len(rows) == 1000, f"{_FILE} must have 1000 lines, found {len(rows)}"
    return tuple(rows)


def names() -> list[str]:
    """Short class names (first lemma), index order: names()[281] == 'tabby'."""
    return [row[0] for row in lemmas()]
