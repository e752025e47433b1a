"""Heads of the two-tower task: which classes each trains on and names, and the head module.

A head is one experiment of a run: a projection of image (and text) features into the shared
space, its own temperature, and the class subset it trains on. `make_heads` turns
`config.heads` into the list of heads; `head_options` reads the projections and the logit
parameters from `config.model`; `vmapped_heads` stacks the heads' parameters on a leading axis so
one jitted step trains them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xmodal_jax import config as config_lib
from xmodal_jax.errors import UserError
from xmodal_jax.models import axes, fusion
from xmodal_jax.models.fusion import itm_head
from xmodal_jax.objectives import contrastive


@dataclasses.dataclass(frozen=True)
class Head:
    """One trained head: the classes it trains on and the name it gives every class."""

    name: str  # 'all', 'split_0', 'split_0/control', 'split_0/calibration'
    split: int
    role: str  # 'main' | 'control' | 'calibration'
    train_classes: tuple[int, ...]
    unseen: tuple[int, ...]  # the split's unseen (test-time zero-shot) classes
    names: tuple[str, ...]  # name of every class as this head sees it
    pseudo_unseen: tuple[int, ...] = ()  # calibration heads: seen classes held out


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of range(n) with no fixed point (redrawn until so)."""
    if n < 2:
        raise UserError("A permuted-names control needs at least 2 classes.")
    while True:
        perm = rng.permutation(n)
        if np.all(perm != np.arange(n)):
            return perm


def make_heads(class_names: Sequence[str], cfg: Mapping[str, Any]) -> list[Head]:
    """The heads of `config.heads` (see the module docstring); main heads come first.

    Split k's control head names class c by `names[perm_k[c]]`, perm_k a derangement drawn
    from `np.random.default_rng([seed, k, 1])`; its calibration head holds out
    `calibration_holdout` seen classes drawn from `np.random.default_rng([seed, k, 2])`.
    """
    names = tuple(class_names)
    index = {n: i for i, n in enumerate(names)}
    splits = [tuple(s) for s in cfg["unseen"]]
    if not splits:
        if cfg["control"] or cfg["calibration_holdout"]:
            raise UserError("config.heads: control and calibration_holdout need `unseen` splits.")
        return [Head("all", 0, "main", tuple(range(len(names))), (), names)]
    unseen_idx = []
    for k, split in enumerate(splits):
        bad = [n for n in split if n not in index]
        if bad or not split:
            raise UserError(
                f"config.heads.unseen[{k}]={list(split)}: {bad or 'empty'}; use class names "
                f"of the dataset: {list(names)}."
            )
        unseen_idx.append(tuple(sorted(index[n] for n in split)))
    mains, controls, calibs = [], [], []
    for k, unseen in enumerate(unseen_idx):
        seen = tuple(c for c in range(len(names)) if c not in unseen)
        if len(seen) < 2:
            raise UserError(f"config.heads.unseen[{k}] leaves fewer than 2 seen classes.")
        mains.append(Head(f"split_{k}", k, "main", seen, unseen, names))
        if cfg["control"]:
            perm = derangement(len(names), np.random.default_rng([cfg["seed"], k, 1]))
            permuted = tuple(names[p] for p in perm)
            controls.append(Head(f"split_{k}/control", k, "control", seen, unseen, permuted))
        hold = int(cfg["calibration_holdout"])
        if hold:
            if not 0 < hold <= len(seen) - 2:
                raise UserError(
                    f"config.heads.calibration_holdout={hold}: must leave at least 2 of the "
                    f"{len(seen)} seen classes of split {k} for training."
                )
            rng = np.random.default_rng([cfg["seed"], k, 2])
            pseudo = tuple(sorted(int(c) for c in rng.choice(seen, hold, replace=False)))
            kept = tuple(c for c in seen if c not in pseudo)
            calibs.append(
                Head(f"split_{k}/calibration", k, "calibration", kept, unseen, names, pseudo)
            )
    return mains + controls + calibs


PROJ_DEFAULTS = {"kind": "linear", "hidden": 0, "norm": "none", "init_scale": 1.0}


def head_options(
    model: Mapping[str, Any],
    *,
    text_width: int,
    image_cached: bool,
    loss: Mapping[str, Any],
    fusion_head: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """`HeadModule` keyword arguments from `config.model`: the projections into `embed_dim`
    (0: the text tower's width, images projected into the text space), the loss's logit
    parameters (`loss`: `config.model.loss` with its defaults filled in) and the fused ITM head,
    if any (`fusion_head`: its name and module options, checked here)."""
    image_proj = config_lib.options(
        model.get("image_proj"), PROJ_DEFAULTS, "config.model.image_proj"
    )
    text_proj = config_lib.options(
        model.get("text_proj"), {**PROJ_DEFAULTS, "kind": "none"}, "config.model.text_proj"
    )
    embed_dim = int(model.get("embed_dim") or 0)
    if not embed_dim:
        if text_proj["kind"] != "none":
            raise UserError(
                "config.model.embed_dim=0 projects images into the text tower's space; "
                "set text_proj.kind='none' or give embed_dim."
            )
        embed_dim = text_width
    elif text_proj["kind"] == "none" and embed_dim != text_width:
        raise UserError(
            f"config.model.embed_dim={embed_dim} but text_proj.kind='none' keeps the text "
            f"tower's width {text_width}; set embed_dim to {text_width} or 0, or project."
        )
    if text_proj["norm"] != "none":
        raise UserError("config.model.text_proj.norm: only the image projection standardises.")
    if image_proj["norm"] == "standardize" and not image_cached:
        raise UserError(
            "config.model.image_proj.norm='standardize' takes its statistics from the cached "
            "image features; lock the image tower with a deterministic data.pp, or use 'none'."
        )
    fusion_kw = None
    if fusion_head:
        opts = dict(fusion_head)
        head_name = opts.pop("name")
        try:
            fusion_kw = {"out_dim": 256, **opts}
            fusion.build(head_name, **fusion_kw)  # checks the name and the keys
        except ValueError as e:
            raise UserError(f"config.model.fusion: {e}") from None
        fusion_kw["name"] = head_name
    return dict(
        out_dim=embed_dim,
        image_proj=image_proj,
        text_proj=text_proj,
        loss=loss["name"],
        log_scale_init=float(loss["log_scale_init"]),
        bias_init=float(loss["bias_init"]),
        fusion=fusion_kw,
    )


class Projection(nn.Module):
    """Optional standardisation (statistics in the `stats` collection), then `linear`, `mlp`
    (one GELU hidden layer) or `none` (identity) into `out_dim`."""

    out_dim: int
    kind: str = "linear"
    hidden: int = 0
    norm: str = "none"  # 'none' | 'standardize'
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.norm == "standardize":
            d = x.shape[-1]
            mean = self.variable("stats", "mean", jnp.zeros, (d,), jnp.float32).value
            std = self.variable("stats", "std", jnp.ones, (d,), jnp.float32).value
            x = (x - mean) / std
        elif self.norm != "none":
            raise UserError(f"Projection norm={self.norm!r}: use 'none' or 'standardize'.")
        if self.kind == "none":
            return x
        if self.kind not in ("linear", "mlp"):
            raise UserError(f"Projection kind={self.kind!r}: use 'linear', 'mlp' or 'none'.")
        init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
        if self.kind == "mlp":
            width = self.hidden or self.out_dim
            x = nn.gelu(fusion.common.dense(width, (axes.EMBED, axes.MLP), name="hidden")(x))
        dense = nn.Dense(
            self.out_dim,
            kernel_init=nn.with_logical_partitioning(init, (None, axes.EMBED)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.EMBED,)),
            name="out",
        )
        return dense(x)


class HeadModule(nn.Module):
    """One head: image and text projections, the loss's logit parameters, an optional ITM head.

    `__call__(image_feats, text_feats)` returns the projected embeddings and the logit
    parameters; `match(image_feats, text_feats)` the ITM scores (needs `fusion`)."""

    out_dim: int
    image_proj: Mapping[str, Any]
    text_proj: Mapping[str, Any]
    loss: str
    log_scale_init: float
    bias_init: float
    fusion: Mapping[str, Any] | None = None

    def setup(self):
        self.image = Projection(self.out_dim, **self.image_proj)
        self.text = Projection(self.out_dim, **self.text_proj)
        if self.loss == "clip":
            self.logit = contrastive.LogitScale(self.log_scale_init)
        else:
            self.logit = contrastive.SigLIPLogitParams(self.log_scale_init, self.bias_init)
        if self.fusion:
            opts = dict(self.fusion)
            self.itm_head = itm_head.ITMHead(fusion.build(opts.pop("name"), **opts))

    def logit_params(self) -> tuple[jax.Array, jax.Array]:
        if self.loss == "clip":
            return self.logit(), jnp.zeros((), jnp.float32)
        return self.logit()

    def __call__(self, image_feats: jax.Array, text_feats: jax.Array) -> dict[str, jax.Array]:
        log_scale, bias = self.logit_params()
        out = {"image": self.image(image_feats), "text": self.text(text_feats)}
        out.update(log_scale=log_scale, bias=bias)
        if self.fusion and self.is_initializing():
            n = min(image_feats.shape[0], text_feats.shape[0])
            self.itm_head(image_feats[:n], text_feats[:n])
        return out

    def embed_image(self, image_feats: jax.Array) -> jax.Array:
        return self.image(image_feats)

    def embed_text(self, text_feats: jax.Array) -> jax.Array:
        return self.text(text_feats)

    def match(self, image_feats: jax.Array, text_feats: jax.Array) -> jax.Array:
        """ITM logits [B] of image-text pairs (row i with row i)."""
        return self.itm_head(image_feats, text_feats)["score"]


def standardize_stats(
    template: Any, feats: np.ndarray, labels: np.ndarray | None, heads: Sequence[Head]
) -> Any:
    """The `stats` collection of `vmapped_heads` (shaped like `template`): per head, the mean and
    std of the training features (`feats` [N, D]) of the head's own classes."""
    feats = feats.astype(np.float64)
    means, stds = [], []
    for h in heads:
        rows = (
            feats
            if labels is None or not h.train_classes
            else feats[np.isin(labels, h.train_classes)]
        )
        means.append(rows.mean(0))
        stds.append(rows.std(0) + 1e-6)
    mean = jnp.asarray(np.stack(means), jnp.float32)
    std = jnp.asarray(np.stack(stds), jnp.float32)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: mean if p[-1].key == "mean" else std, nn.unbox(template)
    )


def vmapped_heads(num_heads: int, text_axis: int | None, **kwargs) -> nn.Module:
    """`num_heads` independent `HeadModule`s in one module, parameters stacked on axis 0.

    Image features are shared by all heads; text features too (`text_axis=None`) or one set
    per head (`text_axis=0`, e.g. class names that differ between heads)."""
    common = dict(
        variable_axes={"params": 0, "stats": 0},
        split_rngs={"params": True},
        out_axes=0,
        axis_size=num_heads,
        metadata_params={nn.PARTITION_NAME: None},
    )
    methods = {
        "__call__": {**common, "in_axes": (None, text_axis)},
        "embed_image": {**common, "in_axes": (None,)},
        "embed_text": {**common, "in_axes": (text_axis,)},
    }
    return nn.vmap(HeadModule, methods=methods)(**kwargs)
