"""Two-tower image-text task: a vision tower and a text tower, projection heads into a shared
space, a CLIP (softmax) or SigLIP (sigmoid) contrastive loss, and optionally a fused head
trained for image-text matching (ITM) beside it.

Texts come from the data in one of two ways (`config.data.text`; each is an object of
`two_tower_texts` that owns what differs between them):
- `'class_names'`: a classification dataset; the texts of an image are its class name put into
  prompt templates ("a photo of a {}."). The loss compares every image with every class's text:
  CLIP's image->text softmax over the class prompts, or SigLIP's sigmoid over all
  image x class pairs. The text->image half of CLIP is left out: one class prompt has many
  matching images in a batch.
- `'captions'`: matched image-caption pairs (`text_pp` picks one caption and tokenises it); the
  standard symmetric CLIP loss or SigLIP over the batch (`objectives.contrastive`), sharded with
  `shard_map` when `model.loss.sharded`.

Towers (`config.model.image`, `config.model.text`): `tower` (a zoo name), `pretrained` (a
`pretrained.load` name or path; its architecture wins), `overrides`, `locked`. A locked tower is
outside the trained parameters and runs without gradient. Its outputs are **cached** on disk
(`feature_cache`) when its input is deterministic: the image tower when `data.pp` draws no random
numbers, the text tower for class prompts. With a cached image tower the input pipeline reads
cached features instead of images, so LiT-style training costs only the heads. (Freezing by
`config.schedule` / `config.transfer='lit'` also works, but keeps the tower in the step; a tower
frozen for the whole run runs in inference mode there, as a locked one does.) `statistics`:
`'source'` gives a locked image tower BatchNorm statistics of the source (`zeroshot_adabn`).

Heads (`config.heads`) turn one run into several experiments trained side by side, e.g. the 5
seen/unseen splits of the quick start: each head has its own projections and temperature (one
`nn.vmap` over a leading head axis) and trains only on the examples of its own classes (rows of
classes that no head trains on are never read; `trained_classes`):
- `unseen`: per split, the class names held out of training (default: one head, all classes);
- `control`: also train, per split, a head on randomly permuted class names (a derangement), the
  control for zero-shot accuracy that does not come from the names' meaning;
- `calibration_holdout`: also train, per split, a head without this many further seen classes,
  on which generalised zero-shot evaluation chooses its seen-class penalty;
- `seed`: seeds the permutations and the held-out classes.

Losses (`config.model.loss`, `config.model.fusion`) and the temperature clamp:
`two_tower_losses`.

Parameters: `{'img': ..., 'txt': ...}` for trainable towers, `'heads'` for the heads (leading
axis = number of heads). Non-trained state: `batch_stats` of trainable BatchNorm towers,
`frozen` (locked towers that run in the step), `stats` (per-head feature standardisation).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from xmodal_jax import config as config_lib
from xmodal_jax.data import pipeline, preprocess
from xmodal_jax.errors import UserError
from xmodal_jax.evaluation import zeroshot as zs
from xmodal_jax.objectives import contrastive
from xmodal_jax.objectives.class_contrastive import clamp_projected
from xmodal_jax.parallel import mesh as mesh_lib
from xmodal_jax.tasks import Variables, feature_cache, zeroshot_adabn
from xmodal_jax.tasks.two_tower_heads import (
    HeadModule,
    head_options,
    standardize_stats,
    vmapped_heads,
)
from xmodal_jax.tasks.two_tower_losses import fusion_options, itm_loss, loss_options
from xmodal_jax.tasks.two_tower_predict import (
    TwoTowerPredictions,
    head_variables,
    tower_variables,
)
from xmodal_jax.tasks.two_tower_texts import TEXT_SOURCES
from xmodal_jax.tasks.two_tower_towers import (
    TEXT_DEFAULTS,
    TOWER_DEFAULTS,
    Tower,
    build_tower,
    pooled_width,
    tower_apply,
)
from xmodal_jax.transfer import rule_plans
from xmodal_jax.transfer import rules as rules_lib

HEADS_DEFAULTS = {"unseen": (), "control": False, "calibration_holdout": 0, "seed": 0}


# ------------------------------------------------------------------ the task


class TwoTower(TwoTowerPredictions):
    """See the module docstring. What evaluators call (`image_embeddings`, `class_embeddings`,
    `text_embeddings`, `match_scores`) is in `two_tower_predict`."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
        self.config = config
        model = config.model
        known = {"image", "text", "embed_dim", "image_proj", "text_proj", "loss", "fusion"}
        unknown = sorted(set(model.keys()) - known)
        if unknown:
            raise UserError(f"config.model has unknown keys {unknown}; valid: {sorted(known)}.")
        self.image_opts = config_lib.options(
            model.get("image"), TOWER_DEFAULTS, "config.model.image"
        )
        self.text_opts = config_lib.options(model.get("text"), TEXT_DEFAULTS, "config.model.text")
        self.loss_opts, self.loss_fns = loss_options(model.get("loss"))
        self.pair_loss = self.loss_fns.pairs
        if self.loss_opts["sharded"]:  # over the trainer's mesh (a task built alone: its own)
            mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
            self.pair_loss = functools.partial(self.loss_fns.pairs_sharded, mesh=mesh)
        self.fusion_opts, fusion_head = fusion_options(model.get("fusion"))
        self.data = dict(config.data.to_dict() if hasattr(config.data, "to_dict") else config.data)
        text = self.data.get("text", "class_names")
        if text not in TEXT_SOURCES:
            raise UserError(f"config.data.text={text!r}: use one of {tuple(TEXT_SOURCES)}.")
        self.templates = tuple(self.data.get("templates") or zs.DEFAULT_TEMPLATES)
        heads_cfg = config_lib.options(config.get("heads"), HEADS_DEFAULTS, "config.heads")

        src = pipeline.source(self.data["name"], self.data["split"], self.data.get("data_dir"))
        example = src[0]
        self.texts = TEXT_SOURCES[text](self.data, heads_cfg)
        self.class_names, self.heads = self.texts.class_names, self.texts.heads
        self.num_heads = len(self.heads)

        image_pp = self.data.get("pp", "")
        self.image_random = feature_cache.uses_randomness(image_pp, example)
        dummy_image = preprocess.compose(image_pp)(dict(example))[self.image_opts["input_key"]]
        self.dummy_image = dummy_image = np.asarray(dummy_image)[None]
        self.image_tower = build_tower("image", self.image_opts, config.seed, dummy_image)
        dummy_text = np.zeros((1, self.text_opts["max_len"]), np.int32)
        self.text_tower = build_tower("text", self.text_opts, config.seed + 1, dummy_text)
        if self.text_tower.tokenizer is None:
            raise UserError("The text tower has no tokenizer; set config.model.text.vocab.")
        self.image_cached = (
            self.image_tower.locked and self.image_opts["cache"] and not self.image_random
        )
        self.text_cached = self.text_tower.locked and self.texts.cacheable_text
        self._cache = feature_cache.FeatureCache(config.get("cache_dir"))
        self.image_tower = zeroshot_adabn.with_statistics(  # config.model.image.statistics
            self.image_tower, self.text_tower, self.image_cached, self.data, self.texts, self._cache
        )
        trainable = [t for t in (self.image_tower, self.text_tower) if not t.locked]
        if trainable and self.num_heads > 1:
            raise UserError(
                f"config.heads gives {self.num_heads} heads but the "
                f"{' and '.join(t.kind for t in trainable)} tower is trained: the heads would "
                "share it. Lock the towers, or run one split per run."
            )
        self.image_width = pooled_width(self.image_tower, dummy_image)
        self.text_width = pooled_width(self.text_tower, dummy_text)
        kwargs = head_options(
            model,
            text_width=self.text_width,
            image_cached=self.image_cached,
            loss=self.loss_opts,
            fusion_head=fusion_head,
        )
        self.head_module = HeadModule(**kwargs)
        self.heads_module = vmapped_heads(self.num_heads, self.texts.text_axis, **kwargs)
        self._train_arrays = None

    # -------------------------------------------------------------- cached tower outputs

    def cached_image_features(
        self, data_cfg: Mapping[str, Any], tower: Tower | None = None
    ) -> dict[str, np.ndarray]:
        """`{'pooled': [N, D], 'label': [N], 'index': [N]}` of the locked image tower (or of
        `tower`) on a split, from the feature cache (computed on a miss)."""
        tower = tower or self.image_tower
        fn = jax.jit(lambda v, x: tower.module.apply(v, x)["pooled"])
        return feature_cache.tower_outputs(
            lambda x: {"pooled": fn(tower.variables, x)},
            data_cfg,
            tower=tower.description(),
            input_key=self.image_opts["input_key"],
            batch_size=int(self.image_opts["batch_size"]),
            cache=self._cache,
        )

    @functools.cached_property
    def cached_class_text(self) -> np.ndarray:
        """Cached `class_prompt_features` of the locked text tower (computed once)."""
        description = {
            "tower": self.text_tower.description(),
            "names": sorted({n for h in self.heads for n in h.names}),
            "templates": list(self.templates),
            "max_len": self.text_opts["max_len"],
            "heads": [list(h.names) for h in self.heads],
        }
        out = self._cache.get_or_compute(
            {"kind": "class_prompts", **description},
            lambda: {"features": self.class_prompt_features(None)},
        )
        return out["features"]

    def _train_split_features(self) -> dict[str, np.ndarray]:
        if self._train_arrays is None:
            self._train_arrays = self.cached_image_features(self.data)
        return self._train_arrays

    # -------------------------------------------------------------- input pipeline

    def trained_classes(self) -> list[int] | None:
        """The classes some head trains on, when that is not every class (else None).

        Training reads only their rows: with one head (every config that trains a tower), a
        tower's gradients and BatchNorm statistics never see an image of a held-out class. With
        several heads (locked towers only), each head's loss also masks the rows of the classes
        it holds out (`texts.class_mask`), so no head learns from its own unseen classes.
        """
        return self.texts.trained_classes()

    def train_iterator(self, process_index: int, process_count: int) -> grain.DatasetIterator:
        cfg, batch_size = self.config, self.config.batch_size
        if self.text_cached:
            self.cached_class_text  # noqa: B018  (computed here, outside any jit trace)
        keep = self.trained_classes()
        if not self.image_cached:
            data = dict(self.data)
            parts = [data.get("pp", ""), data.get("text_pp", "")]
            parts += self.texts.image_pp(self.image_opts["input_key"])
            data["pp"] = "|".join(filter(None, parts))
            rows = None
            if keep is not None:
                labels = pipeline.split_labels(data["name"], data["split"], data.get("data_dir"))
                rows = np.flatnonzero(np.isin(labels, keep))
            return pipeline.train_iterator(
                data,
                batch_size=batch_size,
                seed=cfg.seed,
                process_index=process_index,
                process_count=process_count,
                indices=rows,
            )
        arrays = self._train_split_features()
        if keep is not None:
            rows = np.flatnonzero(np.isin(arrays["label"], keep))
            arrays = {k: v[rows] for k, v in arrays.items()}
        fields = {"image_feats": arrays["pooled"], **self.texts.cached_fields(arrays)}
        key = self.image_opts["input_key"]  # captions: one drawn per row and step (`add`)
        add = lambda ds: self.texts.add_text(ds, self.data, key, cfg.seed + 1)
        return feature_cache.train_iterator(
            fields, batch_size=batch_size, seed=cfg.seed, process_index=process_index,
            process_count=process_count, where=self.data["name"],
            add=None if self.texts.cacheable_text else add,  # class names: whole batches
        )  # fmt: skip

    # -------------------------------------------------------------- init

    def init(self, rng: jax.Array, batch: dict) -> Variables:
        img_rng, txt_rng, head_rng = jax.random.split(rng, 3)
        params, state = {}, {}
        for tower, name, r in (
            (self.image_tower, "img", img_rng),
            (self.text_tower, "txt", txt_rng),
        ):
            if tower.locked:
                if not (tower is self.image_tower and self.image_cached) and not (
                    tower is self.text_tower and self.text_cached
                ):
                    state.setdefault("frozen", {})[name] = tower.variables
                continue
            if tower.variables is not None:
                v = dict(tower.variables)
            else:
                if name == "img":
                    dummy = batch[self.image_opts["input_key"]][:1]
                else:
                    dummy = jnp.zeros((1, self.text_opts["max_len"]), jnp.int32)
                v = dict(tower.module.init({"params": r, "dropout": r}, dummy))
            params[name] = v.pop("params")
            if "batch_stats" in v:
                state.setdefault("batch_stats", {})[name] = v.pop("batch_stats")
        image_feats = jnp.zeros((1, self.image_width), jnp.float32)
        text_feats = self.texts.init_text(self.text_width)
        head_vars = dict(self.heads_module.init(head_rng, image_feats, text_feats))
        params["heads"] = head_vars.pop("params")
        if "stats" in head_vars:
            arrays = self._train_split_features()
            stats = standardize_stats(
                head_vars["stats"], arrays["pooled"], arrays.get("label"), self.heads
            )
            state["stats"] = {"heads": stats}
        return {"params": params, **state}

    # -------------------------------------------------------------- forward passes

    @functools.cached_property
    def _rules(self) -> rule_plans.Rules:
        return rules_lib.from_config(self.config)[0]

    def _frozen_by_rules(self, params, name: str) -> bool:
        """A tower that the optimiser rules freeze for the whole run runs in inference mode, as
        a locked one does: BatchNorm statistics stay as loaded and dropout is off."""
        return rule_plans.frozen_throughout(self._rules, params, name)

    def _image_features(self, params, model_state, batch, rng, train: bool):
        """Pooled image-tower outputs `[B, Di]` and updated batch stats (or None)."""
        if "image_feats" in batch:
            return batch["image_feats"].astype(jnp.float32), None
        images = batch[self.image_opts["input_key"]]
        if self.image_tower.locked:
            out, _ = tower_apply(self.image_tower, model_state["frozen"]["img"], images)
            return jax.lax.stop_gradient(out["pooled"]).astype(jnp.float32), None
        v = tower_variables({"params": params, **model_state}, "img")
        train = train and not self._frozen_by_rules(params, "img")
        out, stats = tower_apply(self.image_tower, v, images, train=train, rng=rng)
        return out["pooled"].astype(jnp.float32), stats

    def text_features(self, params, model_state, ids, rng, train: bool):
        if self.text_tower.locked:
            v = model_state["frozen"]["txt"]
            return jax.lax.stop_gradient(self.text_tower.module.apply(v, ids)["pooled"])
        v = tower_variables({"params": params, **model_state}, "txt")
        train = train and not self._frozen_by_rules(params, "txt")
        out, _ = tower_apply(self.text_tower, v, ids, train=train, rng=rng)
        return out["pooled"].astype(jnp.float32)

    def class_text_features(self, params, model_state, rng, train: bool):
        """`[H, C, Dt]` class-prompt features: cached (locked text) or, for a trained text
        tower, one randomly chosen template per class and step."""
        if self.text_cached:
            return jnp.asarray(self.cached_class_text)
        ids = self._class_prompt_ids()  # [H, C, T, L]
        h, c, t, length = ids.shape
        pick = jax.random.randint(rng, (h, c), 0, t) if train else None
        if pick is None:
            flat = ids.reshape(h * c * t, length)
            z = self.text_features(params, model_state, flat, rng, train)
            z = contrastive.l2_normalize(z).reshape(h, c, t, -1).mean(2)
            return contrastive.l2_normalize(z)
        chosen = jnp.take_along_axis(ids, pick[..., None, None], axis=2)[:, :, 0]
        z = self.text_features(params, model_state, chosen.reshape(h * c, length), rng, train)
        return contrastive.l2_normalize(z).reshape(h, c, -1)

    def _class_prompt_ids(self) -> jax.Array:
        if not hasattr(self, "_prompt_ids"):
            tok = self.text_tower.tokenizer
            ids = [
                [tok.encode([t.replace("{}", n) for t in self.templates]) for n in h.names]
                for h in self.heads
            ]
            self._prompt_ids = jnp.asarray(np.asarray(ids, np.int32))
        return self._prompt_ids

    def logit_scale(self, log_scale):
        bound = self.loss_opts["max_log_scale"]
        return log_scale if bound is None else clamp_projected(log_scale, float(bound))

    # -------------------------------------------------------------- loss

    def loss(self, params, model_state, batch, rng, progress):
        del progress
        img_rng, txt_rng, itm_rng = jax.random.split(rng, 3)
        image_feats, new_stats = self._image_features(params, model_state, batch, img_rng, True)
        head_vars = head_variables(params, model_state)
        c = self.texts.contrast(self, params, model_state, batch, image_feats, head_vars, txt_rng)
        loss = self.loss_opts["weight"] * c.per_head.sum()
        metrics = {
            "contrastive_loss": c.per_head.mean(),
            "accuracy": c.accuracy,
            "log_scale": c.log_scale.mean(),
        }
        if self.fusion_opts["name"]:
            match_loss, match_acc = itm_loss(
                self.head_module,
                self.fusion_opts,
                head_vars,
                image_feats,
                c.text_pairs,
                c.sim_pairs,
                c.labels,
                c.mask,
                itm_rng,
            )
            loss = loss + self.fusion_opts["weight"] * match_loss.sum()
            metrics.update(itm_loss=match_loss.mean(), itm_accuracy=match_acc.mean())
        if new_stats is not None:
            model_state = {
                **model_state,
                "batch_stats": {**model_state["batch_stats"], "img": new_stats},
            }
        return loss, (model_state, metrics)

    # -------------------------------------------------------------- prediction (evaluators)

    def predict(self, variables: Variables, batch: dict) -> dict[str, jax.Array]:
        """`image_feats` [B, Di] and per-head, L2-normalised `image_emb` [H, B, D] of a batch
        of images (or of cached `image_feats`)."""
        params = variables["params"]
        state = {k: v for k, v in variables.items() if k != "params"}
        feats, _ = self._image_features(params, state, batch, None, False)
        head_vars = head_variables(params, state)
        zi = self.heads_module.apply(head_vars, feats, method="embed_image")
        return {"image_feats": feats, "image_emb": contrastive.l2_normalize(zi)}
