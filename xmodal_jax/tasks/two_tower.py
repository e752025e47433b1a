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
frozen for the whole run runs in inference mode there, as a locked one does.)

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

Temperature: open_clip clamps its `logit_scale` parameter to <= log 100 after every optimiser
step (`training/train.py`); a task cannot hook the step, so here the parameter is left
unconstrained and the *value used* is clamped to `loss.max_log_scale` (CLIP default log 100,
SigLIP none). The clamp's gradient is a projection: above the bound, gradients that would push
the parameter further up are dropped and those that pull it down pass at once; the value used
never exceeds the bound (only optimiser momentum can carry the parameter a little past it).

Parameters: `{'img': ..., 'txt': ...}` for trainable towers, `'heads'` for the heads (leading
axis = number of heads). Non-trained state: `batch_stats` of trainable BatchNorm towers,
`frozen` (locked towers that run in the step), `stats` (per-head feature standardisation).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xmodal_jax import config as config_lib
from xmodal_jax.data import pipeline, preprocess
from xmodal_jax.errors import UserError
from xmodal_jax.evaluation import zeroshot as zs
from xmodal_jax.models import fusion
from xmodal_jax.objectives import contrastive, itm
from xmodal_jax.objectives.class_contrastive import (
    clamp_projected,
    class_clip_loss,
    class_siglip_loss,
)
from xmodal_jax.parallel import mesh as mesh_lib
from xmodal_jax.tasks import Variables, feature_cache
from xmodal_jax.tasks.two_tower_heads import HeadModule, vmapped_heads
from xmodal_jax.tasks.two_tower_texts import TEXT_SOURCES
from xmodal_jax.tasks.two_tower_towers import (
    TEXT_DEFAULTS,
    TOWER_DEFAULTS,
    Tower,
    build_tower,
    tower_apply,
)
from xmodal_jax.transfer import rule_plans
from xmodal_jax.transfer import rules as rules_lib


@dataclasses.dataclass(frozen=True)
class Loss:
    """One contrastive loss, chosen once by `config.model.loss.name`: its loss over class prompts
    (`class_names` texts; per head, masked to the head's classes), over matched pairs (plain
    and sharded over the batch axes of a mesh, `captions` texts) and its temperature defaults."""

    classes: Any  # (head outputs, labels [B], log_scale [H], mask [H, C]) -> [H]
    pairs: Any  # (zi, zt, log_scale, bias) -> scalar
    pairs_sharded: Any  # (zi, zt, log_scale, bias, mesh) -> scalar
    log_scale_init: float
    max_log_scale: float | None


def _class_clip(out, labels, log_scale, mask):
    loss = jax.vmap(class_clip_loss, (0, 0, None, 0, 0))
    return loss(out["image"], out["text"], labels, log_scale, mask)


def _class_siglip(out, labels, log_scale, mask):
    loss = jax.vmap(class_siglip_loss, (0, 0, None, 0, 0, 0))
    return loss(out["image"], out["text"], labels, log_scale, out["bias"], mask)


LOSSES = {
    "clip": Loss(
        classes=_class_clip,
        pairs=lambda zi, zt, scale, bias: contrastive.clip_loss(zi, zt, scale),
        pairs_sharded=lambda zi, zt, scale, bias, mesh: contrastive.clip_loss_sharded(
            zi, zt, scale, mesh=mesh
        ),
        log_scale_init=contrastive.clip.LOG_SCALE_INIT,
        max_log_scale=contrastive.clip.LOG_SCALE_MAX,
    ),
    "siglip": Loss(
        classes=_class_siglip,
        pairs=contrastive.siglip_loss,
        pairs_sharded=lambda zi, zt, scale, bias, mesh: contrastive.siglip_loss_sharded(
            zi, zt, scale, bias, mesh=mesh
        ),
        log_scale_init=contrastive.siglip.LOG_SCALE_INIT,
        max_log_scale=None,
    ),
}

PROJ_DEFAULTS = {"kind": "linear", "hidden": 0, "norm": "none", "init_scale": 1.0}
LOSS_DEFAULTS = {
    "name": "clip",
    "log_scale_init": None,  # CLIP: log(1/0.07); SigLIP: log(10)
    "bias_init": contrastive.siglip.BIAS_INIT,
    "max_log_scale": "default",  # CLIP: log(100); SigLIP: none. None disables the clamp.
    "weight": 1.0,
    "sharded": False,  # captions: shard_map losses over the batch axes
}
FUSION_DEFAULTS = {"name": None, "weight": 1.0, "sampling": "hardest", "temperature": 1.0}
HEADS_DEFAULTS = {"unseen": (), "control": False, "calibration_holdout": 0, "seed": 0}


@preprocess.register
def random_caption(key: str = "captions/text", out_key: str = "text") -> preprocess.Op:
    """One caption, uniformly at random, of the (nested, `/`-separated) field `key`; the
    top-level field is dropped so that the examples batch (COCO: `captions/text`)."""
    top, *rest = key.split("/")

    def op(ex: preprocess.Example, rng: np.random.Generator) -> preprocess.Example:
        if top not in ex:
            raise UserError(f"random_caption: no field {top!r}; the example has {sorted(ex)}.")
        value = ex.pop(top)
        for part in rest:
            value = value[part]
        captions = np.atleast_1d(value)
        ex[out_key] = captions[rng.integers(len(captions))]
        return ex

    return op


# ------------------------------------------------------------------ the task


class TwoTower:
    """See the module docstring. Public helpers for evaluators: `heads`, `class_names`,
    `image_embeddings`, `class_embeddings`, `text_embeddings`, `match_scores`."""

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
        self.loss_opts = config_lib.options(model.get("loss"), LOSS_DEFAULTS, "config.model.loss")
        if self.loss_opts["name"] not in LOSSES:
            raise UserError(
                f"config.model.loss.name={self.loss_opts['name']!r}: use {tuple(LOSSES)}."
            )
        self.loss_fns = LOSSES[self.loss_opts["name"]]
        self.pair_loss = self.loss_fns.pairs
        if self.loss_opts["sharded"]:  # over the trainer's mesh (a task built alone: its own)
            mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
            self.pair_loss = functools.partial(self.loss_fns.pairs_sharded, mesh=mesh)
        given = model.get("fusion") or {}
        given = dict(given.to_dict() if hasattr(given, "to_dict") else given)
        self.fusion_head_opts = {k: v for k, v in given.items() if k not in FUSION_DEFAULTS}
        given = {k: v for k, v in given.items() if k in FUSION_DEFAULTS}
        self.fusion_opts = config_lib.options(given, FUSION_DEFAULTS, "config.model.fusion")
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
        self.image_tower = build_tower(
            "image", self.image_opts, config.seed, np.asarray(dummy_image)[None]
        )
        dummy_text = np.zeros((1, self.text_opts["max_len"]), np.int32)
        self.text_tower = build_tower("text", self.text_opts, config.seed + 1, dummy_text)
        if self.text_tower.tokenizer is None:
            raise UserError("The text tower has no tokenizer; set config.model.text.vocab.")
        self.image_cached = (
            self.image_tower.locked and self.image_opts["cache"] and not self.image_random
        )
        self.text_cached = self.text_tower.locked and self.texts.cacheable_text
        self._cache = feature_cache.FeatureCache(config.get("cache_dir"))
        trainable = [t for t in (self.image_tower, self.text_tower) if not t.locked]
        if trainable and self.num_heads > 1:
            raise UserError(
                f"config.heads gives {self.num_heads} heads but the "
                f"{' and '.join(t.kind for t in trainable)} tower is trained: the heads would "
                "share it. Lock the towers, or run one split per run."
            )
        self._build_heads_module()
        self._train_arrays = None

    # -------------------------------------------------------------- modules and tower widths

    def _tower_width(self, tower: Tower, dummy: np.ndarray) -> int:
        variables = tower.variables
        if variables is None:
            shapes = jax.eval_shape(tower.module.init, jax.random.key(0), dummy)
            return int(jax.eval_shape(tower.module.apply, shapes, dummy)["pooled"].shape[-1])
        return int(jax.eval_shape(tower.module.apply, variables, dummy)["pooled"].shape[-1])

    def _build_heads_module(self):
        opts = self.config.model
        text_width = self._tower_width(
            self.text_tower, np.zeros((1, self.text_opts["max_len"]), np.int32)
        )
        src = pipeline.source(self.data["name"], self.data["split"], self.data.get("data_dir"))
        image = preprocess.compose(self.data.get("pp", ""))(dict(src[0]))
        image = np.asarray(image[self.image_opts["input_key"]])[None]
        self.image_width = self._tower_width(self.image_tower, image)
        self.text_width = text_width
        image_proj = config_lib.options(
            opts.get("image_proj"), PROJ_DEFAULTS, "config.model.image_proj"
        )
        text_proj = config_lib.options(
            opts.get("text_proj"), {**PROJ_DEFAULTS, "kind": "none"}, "config.model.text_proj"
        )
        embed_dim = int(opts.get("embed_dim") or 0)
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
        if image_proj["norm"] == "standardize" and not self.image_cached:
            raise UserError(
                "config.model.image_proj.norm='standardize' takes its statistics from the cached "
                "image features; lock the image tower with a deterministic data.pp, or use 'none'."
            )
        self.embed_dim = embed_dim
        self.image_proj_opts = image_proj
        name = self.loss_opts["name"]
        log_scale_init = self.loss_opts["log_scale_init"]
        if log_scale_init is None:
            log_scale_init = self.loss_fns.log_scale_init
        max_log = self.loss_opts["max_log_scale"]
        self.max_log_scale = self.loss_fns.max_log_scale if max_log == "default" else max_log
        fusion_kw = None
        if self.fusion_opts["name"]:
            head_name = self.fusion_opts["name"]
            try:
                fusion_kw = {"out_dim": 256, **self.fusion_head_opts}
                fusion.build(head_name, **fusion_kw)  # checks the name and the keys
            except ValueError as e:
                raise UserError(f"config.model.fusion: {e}") from None
            fusion_kw["name"] = head_name
        head_kwargs = dict(
            out_dim=embed_dim,
            image_proj=image_proj,
            text_proj=text_proj,
            loss=name,
            log_scale_init=float(log_scale_init),
            bias_init=float(self.loss_opts["bias_init"]),
            fusion=fusion_kw,
        )
        self.head_module = HeadModule(**head_kwargs)
        self.heads_module = vmapped_heads(self.num_heads, self.texts.text_axis, **head_kwargs)

    # -------------------------------------------------------------- cached tower outputs

    def _jit_tower(self, tower: Tower, key: str = "pooled"):
        return jax.jit(lambda v, x: tower.module.apply(v, x)[key])

    def cached_image_features(self, data_cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """`{'pooled': [N, D], 'label': [N], 'index': [N]}` of the locked image tower on a
        split, from the feature cache (computed on a miss)."""
        tower = self.image_tower
        fn = self._jit_tower(tower)
        return feature_cache.tower_outputs(
            lambda x: {"pooled": fn(tower.variables, x)},
            data_cfg,
            tower=tower.description(),
            input_key=self.image_opts["input_key"],
            batch_size=int(self.image_opts["batch_size"]),
            cache=self._cache,
        )

    @functools.cached_property
    def _text_pooled(self):
        return jax.jit(lambda v, ids: self.text_tower.module.apply(v, ids)["pooled"])

    def text_tower_features(self, variables: Variables | None, texts: Sequence[str]) -> np.ndarray:
        """Text-tower pooled outputs `[N, Dt]` of `texts` (float32, not normalised)."""
        ids = self.text_tower.tokenizer.encode(list(texts))
        tv = self._text_variables(variables)
        out = []
        bs = int(self.text_opts["batch_size"])
        for i in range(0, len(ids), bs):
            chunk = ids[i : i + bs]
            pad = np.zeros((bs - len(chunk), ids.shape[1]), np.int32)
            full = np.concatenate([chunk, pad]) if len(pad) else chunk
            out.append(np.asarray(self._text_pooled(tv, full), np.float32)[: len(chunk)])
        return np.concatenate(out)

    def _text_variables(self, variables: Variables | None):
        if self.text_tower.locked:
            return self.text_tower.variables
        return self._trainable_tower_vars(variables, "txt")

    def _trainable_tower_vars(self, variables: Variables, name: str):
        out = {"params": variables["params"][name]}
        stats = variables.get("batch_stats", {})
        if name in stats:
            out["batch_stats"] = stats[name]
        return out

    def class_prompt_features(self, variables: Variables | None = None) -> np.ndarray:
        """`[H, C, Dt]`: per head, the template-averaged, L2-normalised text-tower embedding of
        every class name as that head names it (the zero-shot classifier before projection)."""
        names = sorted({n for h in self.heads for n in h.names})
        encode = lambda prompts: self.text_tower_features(variables, prompts)
        table = zs.build_classifier(names, encode, self.templates)
        row = {n: i for i, n in enumerate(names)}
        return np.stack([table[[row[n] for n in h.names]] for h in self.heads])

    @functools.cached_property
    def _class_text(self) -> np.ndarray:
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
            self._class_text  # noqa: B018  (computed here, outside any jit trace)
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
        return feature_cache.train_iterator(
            fields,
            batch_size=batch_size,
            seed=cfg.seed,
            process_index=process_index,
            process_count=process_count,
            where=self.data["name"],
            add=lambda ds: self.texts.add_text(
                ds, self.data, self.image_opts["input_key"], cfg.seed + 1
            ),
        )

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
            state["stats"] = {"heads": self._standardize_stats(head_vars["stats"])}
        return {"params": params, **state}

    def _standardize_stats(self, template):
        """Per-head mean and std of the cached training features of the head's own classes."""
        arrays = self._train_split_features()
        feats, labels = arrays["pooled"].astype(np.float64), arrays.get("label")
        means, stds = [], []
        for h in self.heads:
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

    # -------------------------------------------------------------- forward passes

    def _head_vars(self, params, model_state):
        out = {"params": params["heads"]}
        if "stats" in model_state:
            out["stats"] = model_state["stats"]["heads"]
        return out

    @functools.cached_property
    def _rules(self) -> rule_plans.Rules:
        return rules_lib.from_config(self.config)[0]

    def _frozen_by_rules(self, params, name: str) -> bool:
        """Whether every parameter of tower `name` is frozen for the whole run by the optimiser
        rules (`config.transfer='lit'`, a `None` schedule). Such a tower runs in inference mode,
        as a locked one does: BatchNorm statistics stay as loaded and dropout is off."""
        if name not in params:
            return False
        plans = rule_plans.leaf_plans(self._rules, params)
        paths = [p for p, _ in rule_plans.named_leaves(params)]
        own = [
            plan.frozen for p, plan in zip(paths, plans, strict=True) if p.startswith(name + "/")
        ]
        return bool(own) and all(own)

    def _image_features(self, params, model_state, batch, rng, train: bool):
        """Pooled image-tower outputs `[B, Di]` and updated batch stats (or None)."""
        if "image_feats" in batch:
            return batch["image_feats"].astype(jnp.float32), None
        images = batch[self.image_opts["input_key"]]
        if self.image_tower.locked:
            out, _ = tower_apply(self.image_tower, model_state["frozen"]["img"], images)
            return jax.lax.stop_gradient(out["pooled"]).astype(jnp.float32), None
        v = self._trainable_tower_vars({"params": params, **model_state}, "img")
        train = train and not self._frozen_by_rules(params, "img")
        out, stats = tower_apply(self.image_tower, v, images, train=train, rng=rng)
        return out["pooled"].astype(jnp.float32), stats

    def text_features(self, params, model_state, ids, rng, train: bool):
        if self.text_tower.locked:
            v = model_state["frozen"]["txt"]
            return jax.lax.stop_gradient(self.text_tower.module.apply(v, ids)["pooled"])
        v = self._trainable_tower_vars({"params": params, **model_state}, "txt")
        train = train and not self._frozen_by_rules(params, "txt")
        out, _ = tower_apply(self.text_tower, v, ids, train=train, rng=rng)
        return out["pooled"].astype(jnp.float32)

    def class_text_features(self, params, model_state, rng, train: bool):
        """`[H, C, Dt]` class-prompt features: cached (locked text) or, for a trained text
        tower, one randomly chosen template per class and step."""
        if self.text_cached:
            return jnp.asarray(self._class_text)
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
        if self.max_log_scale is None:
            return log_scale
        return clamp_projected(log_scale, float(self.max_log_scale))

    # -------------------------------------------------------------- loss

    def loss(self, params, model_state, batch, rng, progress):
        del progress
        img_rng, txt_rng, itm_rng = jax.random.split(rng, 3)
        image_feats, new_stats = self._image_features(params, model_state, batch, img_rng, True)
        head_vars = self._head_vars(params, model_state)
        c = self.texts.contrast(self, params, model_state, batch, image_feats, head_vars, txt_rng)
        loss = self.loss_opts["weight"] * c.per_head.sum()
        metrics = {
            "contrastive_loss": c.per_head.mean(),
            "accuracy": c.accuracy,
            "log_scale": c.log_scale.mean(),
        }
        if self.fusion_opts["name"]:
            itm_loss, itm_acc = self._itm_loss(
                head_vars, image_feats, c.text_pairs, c.sim_pairs, c.labels, c.mask, itm_rng
            )
            loss = loss + self.fusion_opts["weight"] * itm_loss.sum()
            metrics.update(itm_loss=itm_loss.mean(), itm_accuracy=itm_acc.mean())
        if new_stats is not None:
            model_state = {
                **model_state,
                "batch_stats": {**model_state["batch_stats"], "img": new_stats},
            }
        return loss, (model_state, metrics)

    def _itm_loss(self, head_vars, image_feats, text_pairs, sim_pairs, labels, mask, rng):
        """Per-head ITM loss and accuracy with in-batch hard negatives under the head's
        contrastive similarity (`text_pairs` [H, B, Dt], `sim_pairs` [H, B, B]).

        With class names (`labels` [B], `mask` [H, C]) a head sees only the examples of its own
        classes: other examples are never picked as negatives and their pairs get weight 0, and
        texts of the same class are never negatives of each other."""
        opts = self.fusion_opts
        b = image_feats.shape[0]

        def one(hv, sim, texts, r, train):
            if labels is None:
                exclude, w = None, jnp.ones((b,), jnp.float32)
            else:
                w = train[labels].astype(jnp.float32)
                outside = w[:, None] * w[None, :] == 0
                exclude = (labels[:, None] == labels[None, :]) | outside
            t_for_i, i_for_t = itm.hard_negatives(
                sim,
                sampling=opts["sampling"],
                rng=r,
                temperature=opts["temperature"],
                positive_mask=exclude,
            )
            inputs, target = itm.itm_pairs(image_feats, texts, t_for_i, i_for_t)
            score = self.head_module.apply(
                hv, inputs["image_feats"], inputs["text_feats"], method="match"
            ).astype(jnp.float32)
            weight = jnp.concatenate([w, w, w])  # positives, image negatives, text negatives
            total = jnp.maximum(weight.sum(), 1.0)
            bce = optax.sigmoid_binary_cross_entropy(score, target)
            correct = (score > 0) == (target > 0.5)
            return jnp.sum(weight * bce) / total, jnp.sum(weight * correct) / total

        rngs = jax.random.split(rng, self.num_heads)
        train = mask if mask is not None else jnp.ones((self.num_heads, 1), bool)
        return jax.vmap(one)(head_vars, sim_pairs, text_pairs, rngs, train)

    # -------------------------------------------------------------- prediction (evaluators)

    def predict(self, variables: Variables, batch: dict) -> dict[str, jax.Array]:
        """`image_feats` [B, Di] and per-head, L2-normalised `image_emb` [H, B, D] of a batch
        of images (or of cached `image_feats`)."""
        params = variables["params"]
        state = {k: v for k, v in variables.items() if k != "params"}
        feats, _ = self._image_features(params, state, batch, None, False)
        head_vars = self._head_vars(params, state)
        zi = self.heads_module.apply(head_vars, feats, method="embed_image")
        return {"image_feats": feats, "image_emb": contrastive.l2_normalize(zi)}

    def _replicated(self, mesh):
        return NamedSharding(mesh, PartitionSpec()) if mesh is not None else None

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
        cfg = dict(data_cfg)
        for local in pipeline.eval_batches(cfg, batch_size=batch_size):
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

    def _predict_fn(self, mesh):
        key = id(mesh)
        cache = self.__dict__.setdefault("_predict_fns", {})
        if key not in cache:
            cache[key] = jax.jit(self.predict, out_shardings=self._replicated(mesh))
        return cache[key]

    def class_embeddings(
        self, variables: Variables, templates: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per head `(classifier [H, C, D], text features [H, C, Dt])`: every class name (as the
        head names it) put into `templates` (default: the training ones), embedded by the text
        tower, normalised, averaged over templates, projected by the head and normalised."""
        templates = tuple(templates or self.templates)
        if self.text_cached and templates == self.templates:
            feats = self._class_text
        else:
            names = sorted({n for h in self.heads for n in h.names})
            table = zs.build_classifier(
                names, lambda p: self.text_tower_features(variables, p), templates
            )
            row = {n: i for i, n in enumerate(names)}
            feats = np.stack([table[[row[n] for n in h.names]] for h in self.heads])
        head_vars = self._head_vars(variables["params"], variables)
        zt = self.heads_module.apply(head_vars, jnp.asarray(feats), method="embed_text")
        return np.asarray(contrastive.l2_normalize(zt)), np.asarray(feats)

    def text_embeddings(self, variables: Variables, texts: Sequence[str]) -> np.ndarray:
        """`[H, N, D]` normalised, projected embeddings of `texts` (captions mode)."""
        feats = self.text_tower_features(variables, texts)
        head_vars = self._head_vars(variables["params"], variables)
        zt = self.heads_module.apply(
            head_vars, jnp.asarray(self.texts.broadcast(feats)), method="embed_text"
        )
        return np.asarray(contrastive.l2_normalize(zt))

    def match_scores(
        self, variables: Variables, image_feats: np.ndarray, text_feats: np.ndarray, head: int
    ) -> np.ndarray:
        """ITM logits `[N, C]` of head `head` for every image (`image_feats` [N, Di], tower
        outputs) against every text (`text_feats` [C, Dt], tower outputs)."""
        if not self.fusion_opts["name"]:
            raise UserError("ITM scores need a fused head; set config.model.fusion.name.")
        head_vars = jax.tree.map(lambda x: x[head], self._head_vars(variables["params"], variables))
        n, c = len(image_feats), len(text_feats)
        img = np.repeat(np.asarray(image_feats, np.float32), c, axis=0)  # row i*C + j: image i
        txt = np.tile(np.asarray(text_feats, np.float32), (n, 1))  # ... with text j
        fn = self.__dict__.setdefault(
            "_match_fn", jax.jit(lambda v, i, t: self.head_module.apply(v, i, t, method="match"))
        )
        return np.asarray(fn(head_vars, img, txt)).reshape(n, c)
