"""Where the two-tower task's texts come from (`config.data.text`), one object per source:
`class_names` (every class name in prompt templates; each image is scored against every class)
and `captions` (a caption per image; each image is scored against the batch's captions). Each
owns what differs between the two: the heads it allows, which training rows are read, the
fields of a batch, the text features of a step and how images pair with texts in the loss.
The task holds the towers and heads and calls these; the loss itself is chosen once
(`two_tower_losses.LOSSES`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from xmodal_jax.data import pipeline, preprocess
from xmodal_jax.errors import UserError
from xmodal_jax.objectives import contrastive
from xmodal_jax.tasks.two_tower_heads import Head, make_heads


@dataclasses.dataclass
class Contrast:
    """One step's contrastive part, per head, and the pairs ITM learns from."""

    per_head: jax.Array  # [H] contrastive loss
    accuracy: jax.Array  # image -> text top-1 accuracy
    log_scale: jax.Array  # the (clamped) log temperature used
    text_pairs: jax.Array  # [H, B, Dt] the text-tower features paired with each image
    sim_pairs: jax.Array  # [H, B, B] image x paired-text similarity (ITM's hard negatives)
    labels: jax.Array | None  # [B] class labels (class names only)
    mask: jax.Array | None  # [H, C] the classes each head trains on (class names only)


class ClassNameTexts:
    """A classification dataset; an image's texts are its class name in prompt templates. The
    loss compares every image with every class's prompt (per head, masked to its classes)."""

    mode = "class_names"
    text_axis = 0  # the heads' text input is per head: [H, C, Dt]
    cacheable_text = True  # a locked text tower's outputs are cached: the prompts never change

    def __init__(self, data: dict[str, Any], heads_cfg: dict[str, Any]):
        self.class_names = list(
            data.get("class_names") or pipeline.class_names(data["name"], data.get("data_dir"))
        )
        self.heads = make_heads(self.class_names, heads_cfg)

    def class_mask(self) -> np.ndarray:
        """`[H, C]`: the classes each head trains on."""
        mask = np.zeros((len(self.heads), len(self.class_names)), bool)
        for i, h in enumerate(self.heads):
            mask[i, list(h.train_classes)] = True
        return mask

    def trained_classes(self) -> list[int] | None:
        """The classes some head trains on, when that is not every class (else None)."""
        keep = sorted({int(c) for h in self.heads for c in h.train_classes})
        return keep if len(keep) < len(self.class_names) else None

    def image_pp(self, image_key: str) -> list[str]:
        del image_key
        return []

    def cached_fields(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"label": arrays["label"].astype(np.int32)}

    def add_text(self, ds: grain.MapDataset, data: dict[str, Any], image_key: str, seed: int):
        del data, image_key, seed
        return ds

    def init_text(self, text_width: int) -> jax.Array:
        return jnp.zeros((len(self.heads), len(self.class_names), text_width), jnp.float32)

    def broadcast(self, feats: np.ndarray) -> np.ndarray:
        """Text features `[N, Dt]` as the heads take them: one copy per head."""
        return np.broadcast_to(feats, (len(self.heads), *feats.shape))

    def contrast(self, task, params, model_state, batch, image_feats, head_vars, rng) -> Contrast:
        text_feats = task.class_text_features(params, model_state, rng, True)
        out = task.heads_module.apply(head_vars, image_feats, text_feats)
        mask = jnp.asarray(self.class_mask())
        labels = batch["label"]
        log_scale = task.logit_scale(out["log_scale"])
        per_head = task.loss_fns.classes(out, labels, log_scale, mask)
        similarity = jnp.einsum(
            "hbd,hcd->hbc",
            contrastive.l2_normalize(out["image"]),
            contrastive.l2_normalize(out["text"]),
        )
        correct = similarity.argmax(-1) == labels[None]
        weight = mask[:, labels].astype(jnp.float32)
        accuracy = jnp.sum(correct * weight) / jnp.maximum(weight.sum(), 1.0)
        text_pairs = jnp.take(text_feats, labels, axis=1)  # [H, B, Dt]
        sim_pairs = jnp.take(similarity, labels, axis=2)  # [H, B, B]
        return Contrast(per_head, accuracy, log_scale, text_pairs, sim_pairs, labels, mask)


class CaptionTexts:
    """Matched image-caption pairs (`data.text_pp` picks one caption and tokenises it); the
    loss is over the batch's pairs (CLIP's symmetric softmax or SigLIP), with one head."""

    mode = "captions"
    text_axis = None  # the heads' text input is shared: [B, Dt]
    cacheable_text = False  # a new caption every step

    def __init__(self, data: dict[str, Any], heads_cfg: dict[str, Any]):
        if heads_cfg["unseen"]:
            raise UserError("config.heads needs data.text='class_names' (class splits).")
        self.class_names: list[str] = []
        self.heads = [Head("all", 0, "main", (), (), ())]

    def class_mask(self) -> None:
        return None

    def trained_classes(self) -> None:
        return None

    def image_pp(self, image_key: str) -> list[str]:
        return [f"keep('{image_key}', 'text')"]

    def cached_fields(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fields = {"label": arrays["label"].astype(np.int32)} if "label" in arrays else {}
        return {**fields, "index": arrays["index"]}

    def add_text(self, ds: grain.MapDataset, data: dict[str, Any], image_key: str, seed: int):
        """Each cached-feature row gets a caption of its image, drawn by `data.text_pp`."""
        src = pipeline.source(data["name"], data["split"], data.get("data_dir"))
        text_pp = preprocess.compose(data.get("text_pp", ""))

        def add(ex, rng):
            row = dict(src[int(ex.pop("index"))])
            row.pop(image_key, None)
            return {**ex, "text": text_pp(row, rng)["text"]}

        return ds.random_map(add, seed=seed)

    def init_text(self, text_width: int) -> jax.Array:
        return jnp.zeros((1, text_width), jnp.float32)

    def broadcast(self, feats: np.ndarray) -> np.ndarray:
        return feats

    def contrast(self, task, params, model_state, batch, image_feats, head_vars, rng) -> Contrast:
        text_feats = task.text_features(params, model_state, batch["text"], rng, True)
        out = task.heads_module.apply(head_vars, image_feats, text_feats)
        zi, zt = out["image"][0], out["text"][0]
        log_scale = task.logit_scale(out["log_scale"][0])
        per_head = task.pair_loss(zi, zt, log_scale, out["bias"][0])[None]
        sim = contrastive.l2_normalize(zi) @ contrastive.l2_normalize(zt).T
        accuracy = jnp.mean(sim.argmax(-1) == jnp.arange(sim.shape[0]))
        text_pairs = jnp.broadcast_to(text_feats, (len(self.heads), *text_feats.shape))
        return Contrast(per_head, accuracy, log_scale, text_pairs, sim[None], None, None)


TEXT_SOURCES = {"class_names": ClassNameTexts, "captions": CaptionTexts}
