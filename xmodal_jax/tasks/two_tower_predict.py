"""What the evaluators ask of a two-tower task: embeddings of a split's images, of class prompts
and of free texts, and ITM scores. `TwoTowerPredictions` is mixed into `two_tower.TwoTower`; it
reads the task's towers (`image_tower`, `text_tower`), heads (`heads`, `heads_module`,
`head_module`), caches (`image_cached`, `text_cached`, `cached_image_features`,
`cached_class_text`) and `predict`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from xmodal_jax.data import pipeline
from xmodal_jax.errors import UserError
from xmodal_jax.evaluation import zeroshot as zs
from xmodal_jax.objectives import contrastive
from xmodal_jax.objectives.adaptation import tent
from xmodal_jax.tasks import Variables, feature_cache


def tower_variables(variables: Variables, name: str) -> Variables:
    """The variables of trainable tower `name` ('img' or 'txt') out of the task's variables."""
    out = {"params": variables["params"][name]}
    stats = variables.get("batch_stats", {})
    if name in stats:
        out["batch_stats"] = stats[name]
    return out


def head_variables(params: Any, model_state: Mapping[str, Any]) -> Variables:
    out = {"params": params["heads"]}
    if "stats" in model_state:
        out["stats"] = model_state["stats"]["heads"]
    return out


class TwoTowerPredictions:
    """Prediction helpers of `TwoTower` for evaluators (see the module docstring)."""

    def predict_fns(self) -> dict[str, Any]:
        """What the evaluators are handed (`Task.predict_fns`)."""
        fns = {
            "predict": self.predict,
            "image_embeddings": self.image_embeddings,
            "tent_image_embeddings": self.tent_image_embeddings,
            "image_tower_variables": self.image_tower_variables,
            "logit_scales": self.logit_scales,
            "class_embeddings": self.class_embeddings,
            "text_embeddings": self.text_embeddings,
            "zeroshot": zs.ZeroShotSetup(
                tuple(self.class_names), tuple(self.heads), self.data, self.templates
            ),
        }
        if self.fusion_opts["name"]:
            fns["match_scores"] = self.match_scores
        if self.text_tower.locked:
            fns["text_classifier"] = self.locked_text_classifier
        if self.image_tower.locked and "logits" in jax.eval_shape(
            self.image_tower.module.apply, self.image_tower.variables, self.dummy_image
        ):
            fns["image_logits"] = self.image_logits
        return fns

    # -------------------------------------------------------------- text tower

    @functools.cached_property
    def _text_pooled(self):
        return jax.jit(lambda v, ids: self.text_tower.module.apply(v, ids)["pooled"])

    def text_tower_features(self, variables: Variables | None, texts: Sequence[str]) -> np.ndarray:
        """Text-tower pooled outputs `[N, Dt]` of `texts` (float32, not normalised)."""
        ids = self.text_tower.tokenizer.encode(list(texts))
        if self.text_tower.locked:
            tv = self.text_tower.variables
        else:
            tv = tower_variables(variables, "txt")
        out = []
        bs = int(self.text_opts["batch_size"])
        for i in range(0, len(ids), bs):
            chunk = ids[i : i + bs]
            pad = np.zeros((bs - len(chunk), ids.shape[1]), np.int32)
            full = np.concatenate([chunk, pad]) if len(pad) else chunk
            out.append(np.asarray(self._text_pooled(tv, full), np.float32)[: len(chunk)])
        return np.concatenate(out)

    def locked_text_classifier(self, names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """`[len(names), Dt]`: the locked text tower's template-averaged, L2-normalised
        embeddings of `names` (`evaluation.zeroshot.build_classifier`), from the feature cache:
        the same for every run with these towers, so e.g. ConSE's 1000 ImageNet names are
        embedded once per machine rather than by every evaluator of every run."""
        if not self.text_tower.locked:
            raise ValueError("locked_text_classifier needs a locked text tower.")
        description = {
            "kind": "text_classifier",
            "tower": self.text_tower.description(),
            "names": list(names),
            "templates": list(templates),
            "max_len": self.text_opts["max_len"],
        }
        encode = lambda prompts: self.text_tower_features(None, prompts)
        compute = lambda: {"classifier": zs.build_classifier(list(names), encode, templates)}
        return self._cache.get_or_compute(description, compute)["classifier"]

    def class_prompt_features(
        self, variables: Variables | None = None, templates: Sequence[str] | None = None
    ) -> np.ndarray:
        """`[H, C, Dt]`: per head, the template-averaged, L2-normalised text-tower embedding of
        every class name as that head names it (the zero-shot classifier before projection).
        `templates` default to the training ones."""
        names = sorted({n for h in self.heads for n in h.names})
        encode = lambda prompts: self.text_tower_features(variables, prompts)
        table = zs.build_classifier(names, encode, tuple(templates or self.templates))
        row = {n: i for i, n in enumerate(names)}
        return np.stack([table[[row[n] for n in h.names]] for h in self.heads])

    # -------------------------------------------------------------- embeddings

    def image_embeddings(
        self, variables: Variables, data_cfg: Mapping[str, Any], *, batch_size: int, mesh=None
    ) -> dict[str, np.ndarray]:
        """Every example of a split: `emb` [H, N, D] (normalised), `feats` [N, Di] (tower
        output), `label` [N] (if any), `index` [N]. Cached tower outputs are used when the
        image tower is cached."""
        fn = self._predict_fn(mesh)
        if self.image_cached:
            arrays = self.cached_image_features(data_cfg)
            feats, embs = [], []
            for i in range(0, len(arrays["pooled"]), batch_size):
                chunk = arrays["pooled"][i : i + batch_size]
                n = len(chunk)
                if n < batch_size:
                    chunk = np.concatenate([chunk, np.zeros((batch_size - n, chunk.shape[1]))])
                out = fn(variables, {"image_feats": jnp.asarray(chunk, jnp.float32)})
                feats.append(np.asarray(out["image_feats"])[:n])
                embs.append(np.asarray(out["image_emb"])[:, :n])
            result = {"feats": np.concatenate(feats), "emb": np.concatenate(embs, axis=1)}
            result.update({k: arrays[k] for k in ("label", "index") if k in arrays})
            return result
        feats, embs, labels = [], [], []
        key = self.image_opts["input_key"]
        for local in pipeline.eval_batches(dict(data_cfg), batch_size=batch_size):
            mask = np.asarray(local["_mask"], bool)
            out = fn(variables, {key: jnp.asarray(local[key])})
            feats.append(np.asarray(out["image_feats"])[mask])
            embs.append(np.asarray(out["image_emb"])[:, mask])
            if "label" in local:
                labels.append(np.asarray(local["label"])[mask])
        result = {"feats": np.concatenate(feats), "emb": np.concatenate(embs, axis=1)}
        if labels:
            result["label"] = np.concatenate(labels)
        result["index"] = np.arange(len(result["feats"]))
        return result

    def image_tower_variables(self, variables: Variables) -> Variables:
        """The image tower's variables: as loaded when locked, else those in `variables`."""
        if self.image_tower.locked:
            return jax.tree.map(jnp.asarray, self.image_tower.variables)
        return tower_variables(variables, "img")

    def tent_image_embeddings(
        self,
        variables: Variables,
        tower_vars: Variables,
        images: jax.Array,
        norm_params: dict | None = None,
        mask: jax.Array | None = None,
        batch_statistics: bool = True,
    ) -> tuple[jax.Array, dict]:
        """TENT's forward pass of the image side: `(image_emb [H, B, D], norm_params)`, the
        tower (`tower_vars`, dropout off) with every BatchNorm normalising with the statistics
        of the batch's rows where `mask` is set (or its running ones: `batch_statistics=False`),
        its BN scales and biases replaced by `norm_params` when given
        (`tent.apply_with_batch_stats`), then each head's projection, L2-normalised. Raises
        ValueError when the tower has no BatchNorm."""
        out, norm = tent.apply_with_batch_stats(
            self.image_tower.module, tower_vars, images, norm_params, mask, batch_statistics
        )
        hv = head_variables(variables["params"], variables)
        zi = self.heads_module.apply(hv, out["pooled"].astype(jnp.float32), method="embed_image")
        return contrastive.l2_normalize(zi), norm

    def logit_scales(self, variables: Variables) -> np.ndarray:
        """`[H]`: each head's logit scale `exp(log_scale)` (clamped as in training)."""
        hv = nn.unbox(head_variables(variables["params"], variables))
        apply = lambda v: self.head_module.apply(v, method="logit_params")[0]
        return np.asarray(jnp.exp(self.logit_scale(jax.vmap(apply)(hv))))

    def _predict_fn(self, mesh):
        cache = self.__dict__.setdefault("_predict_fns", {})
        if id(mesh) not in cache:
            out = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
            cache[id(mesh)] = jax.jit(self.predict, out_shardings=out)
        return cache[id(mesh)]

    def image_logits(
        self, data_cfg: Mapping[str, Any], *, batch_size: int
    ) -> dict[str, np.ndarray]:
        """The locked image tower's own classifier (e.g. ImageNet's) on every example of a split:
        `logits` [N, K], `label` [N], `index` [N]; computed once and cached."""
        tower = self.image_tower
        fn = jax.jit(lambda v, x: tower.module.apply(v, x)["logits"])
        return feature_cache.tower_outputs(
            lambda x: {"logits": fn(tower.variables, x)},
            dict(data_cfg),
            tower=tower.description(),
            outputs=("logits",),
            input_key=self.image_opts["input_key"],
            batch_size=batch_size,
            cache=self._cache,
        )

    def class_embeddings(
        self, variables: Variables, templates: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per head `(classifier [H, C, D], text features [H, C, Dt])`: every class name (as the
        head names it) put into `templates` (default: the training ones), embedded by the text
        tower, normalised, averaged over templates, projected by the head and normalised."""
        templates = tuple(templates or self.templates)
        if self.text_cached and templates == self.templates:
            feats = self.cached_class_text
        else:
            feats = self.class_prompt_features(variables, templates)
        hv = head_variables(variables["params"], variables)
        zt = self.heads_module.apply(hv, jnp.asarray(feats), method="embed_text")
        return np.asarray(contrastive.l2_normalize(zt)), np.asarray(feats)

    def text_embeddings(self, variables: Variables, texts: Sequence[str]) -> np.ndarray:
        """`[H, N, D]` normalised, projected embeddings of `texts` (captions mode)."""
        feats = self.text_tower_features(variables, texts)
        hv = head_variables(variables["params"], variables)
        zt = self.heads_module.apply(
            hv, jnp.asarray(self.texts.broadcast(feats)), method="embed_text"
        )
        return np.asarray(contrastive.l2_normalize(zt))

    def match_scores(
        self, variables: Variables, image_feats: np.ndarray, text_feats: np.ndarray, head: int
    ) -> np.ndarray:
        """ITM logits `[N, C]` of head `head` for every image (`image_feats` [N, Di], tower
        outputs) against every text (`text_feats` [C, Dt], tower outputs)."""
        if not self.fusion_opts["name"]:
            raise UserError("ITM scores need a fused head; set config.model.fusion.name.")
        hv = jax.tree.map(lambda x: x[head], head_variables(variables["params"], variables))
        n, c = len(image_feats), len(text_feats)
        img = np.repeat(np.asarray(image_feats, np.float32), c, axis=0)  # row i*C + j: image i
        txt = np.tile(np.asarray(text_feats, np.float32), (n, 1))  # ... with text j
        fn = self.__dict__.setdefault(
            "_match_fn", jax.jit(lambda v, i, t: self.head_module.apply(v, i, t, method="match"))
        )
        return np.asarray(fn(hv, img, txt)).reshape(n, c)
