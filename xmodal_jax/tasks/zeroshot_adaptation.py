"""Zero-shot adaptation: a two-tower zero-shot classifier adapted to an unlabelled shifted
domain, the class-name text anchors fixed.

The task is `two_tower` (`TwoTower`) with one more input and one more loss term:
- source: the labelled training split of the heads' seen classes (`config.data`, as in the
  quick start); the two-tower contrastive loss on it, unchanged;
- target: unlabelled images of the shifted domain, `config.data.target = {name, split, pp,
  data_dir}` (`pp` defaults to the source's), through the same locked image tower (its cached
  features: the task needs a locked image tower with deterministic `pp`s) and the trainable
  image projection;
- loss = contrastive(source) + warmup(p) * `config.adaptation.weight` * an adaptation loss of
  `objectives.adaptation.SPECS` (`config.adaptation.method`; the other keys of
  `config.adaptation` are that loss's options):
  - on the target zero-shot logits (`entropy`, `mcc`, `im`, `bnm`): `exp(log_scale) *
    cos(image embedding, class-prompt embedding)` over the classes the head may predict;
  - on the L2-normalised projected image embeddings with a domain discriminator (`dann`,
    `cdan`, `cdan_e`; CDAN also conditions on both domains' zero-shot logits), source against
    target, as are the feature-matching losses (`mmd`, `jmmd`, `coral`).
  `importance` replaces the source loss with a labelled one and is not offered.

`config.adaptation.method='none'` adds no term; `config.adaptation.adabn=True` re-estimates
the locked image tower's BatchNorm statistics on the target images first (`zeroshot_adabn`), with
or without a term.

Fixed text anchors: the text tower must be locked (its class-prompt features are cached) and
the adaptation logits take the class embeddings and the temperature without gradient, so the
adaptation term moves only the image projection (and the discriminator); otherwise entropy
could be lowered by raising the temperature alone.

Settings (`config.adaptation.transductive`), never mixed in one run:
- inductive (default): each head's adaptation term reads only the target images of the classes
  that head trains on, and its logits run over those classes' names only, so no image or name of
  its unseen classes enters its training. The target labels are used for that filtering only
  (the closed-set assumption of the inductive setting: the unlabelled target domain holds the
  classes trained on); no batch carries them. Evaluate on the shifted *test* split (the
  evaluators' `dataset` / `split` / `pp`).
- transductive (`transductive=True`): every target image is read, unseen classes included, and
  each head's logits run over every class name it scores (seen and unseen).
Train metrics are logged under `adapt/inductive/` or `adapt/transductive/`, so every record
names its setting. The test-time setting (adapting online on the test stream, e.g. TENT, or
BatchNorm statistics of the test batches) is not this task.

Heads (`config.heads`, as in `two_tower`: splits, control and calibration heads): each head has
its own streams of source and target images for the adaptation term, filtered by its own
classes as above (the source stream by the head's training classes, so no labelled image of its
held-out classes reaches its adversarial term either), its own logits and, for the adversarial
losses, its own discriminator; the terms are summed over heads, as the contrastive losses are.
Batches: `{'source': the two-tower batch, 'adapt_source': {'image_feats', 'index'},
'target': {'image_feats', 'index'}}`, the last two `[B, H, ...]` (row b of head h at `[b, h]`;
`index`: the row of the split); with `method='none'`, `{'source'}` alone, the same source
batches, no target image read in training. Parameters: those of `two_tower`, plus
`discriminator` (`head_<i>`: one per head) for the adversarial losses.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from xmodal_jax.data import pipeline
from xmodal_jax.errors import UserError
from xmodal_jax.objectives import adaptation, contrastive
from xmodal_jax.objectives._util import resolve_config
from xmodal_jax.objectives.adaptation import dann
from xmodal_jax.tasks import Variables, feature_cache, zeroshot_adabn
from xmodal_jax.tasks.domain_adaptation import WARMUPS
from xmodal_jax.tasks.two_tower import TwoTower
from xmodal_jax.tasks.two_tower_heads import Head
from xmodal_jax.tasks.two_tower_predict import head_variables
from xmodal_jax.tasks.two_tower_towers import Tower

OWN_KEYS = ("method", "warmup", "transductive", "adabn")
# Shuffle seeds of head i's streams: config.seed + offset + i (the contrastive batch: config.seed).
TARGET_SEED_OFFSET = 7919
SOURCE_SEED_OFFSET = 104729
PREFETCH_BATCHES = 4


class ZeroShotAdaptation(TwoTower):
    """See the module docstring."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
        super().__init__(config, mesh)
        opts = dict(config.get("adaptation") or {})
        method = opts.get("method")
        if not method:
            raise UserError("config.adaptation.method is not set; name a loss, e.g. 'entropy'.")
        try:  # 'none': no adaptation term (e.g. AdaBN alone)
            self.spec = None if method == "none" else adaptation.get_spec(method)
        except ValueError as e:
            raise UserError(f"config.adaptation.method: {e}") from None
        if self.spec is not None and self.spec.replaces_source_loss:
            raise UserError(
                f"config.adaptation.method={method!r} replaces the source loss with a labelled "
                "one; zero-shot adaptation keeps the contrastive loss. Choose another loss."
            )
        self.method = method
        self.warmup = opts.get("warmup") or "none"
        if self.warmup not in WARMUPS:
            raise UserError(
                f"config.adaptation.warmup={self.warmup!r}; use one of {sorted(WARMUPS)}."
            )
        self.transductive = bool(opts.get("transductive", False))
        self.setting = "transductive" if self.transductive else "inductive"
        self.adabn = bool(opts.get("adabn", False))
        self._adabn_classes = None
        if self.adabn and not self.transductive:
            self._adabn_classes = zeroshot_adabn.statistics_classes(
                self.heads, len(self.class_names)
            )
        self.options = {k: v for k, v in opts.items() if k not in OWN_KEYS}
        try:  # an unknown option is one error now, not inside the first traced step
            resolve_config(self.options, self.spec.defaults if self.spec else {}, method)
        except ValueError as e:
            raise UserError(f"config.adaptation: {e}") from None
        self._check_model()
        self.target = self._target_config()
        every = tuple(range(len(self.class_names)))
        # Per head, the classes its adaptation logits run over: its training classes' names
        # only (inductive), every class name it scores (transductive).
        self.predicted_classes = [
            every if self.transductive else tuple(h.train_classes) for h in self.heads
        ]
        needs_disc = self.spec is not None and self.spec.discriminator_input_dim is not None
        self.discriminator = dann.make_discriminator(self.options) if needs_disc else None

    # -------------------------------------------------------------- checks

    def _check_model(self) -> None:
        if self.texts.mode != "class_names":
            raise UserError("zeroshot_adaptation needs data.text='class_names' (class prompts).")
        if not self.text_tower.locked:
            raise UserError(
                "zeroshot_adaptation keeps the text anchors fixed: lock the text tower "
                "(config.model.text.locked=True)."
            )
        if not self.image_cached:
            raise UserError(
                "zeroshot_adaptation reads cached image features: lock the image tower "
                "(config.model.image.locked=True) and use deterministic data.pp and "
                "data.target.pp (no random ops)."
            )

    def _target_config(self) -> dict:
        target = self.data.get("target")
        if not target or not target.get("name"):
            raise UserError(
                "config.data.target is missing; set {name, split, pp} of the unlabelled "
                "shifted images."
            )
        unknown = sorted(set(target) - {"name", "split", "pp", "data_dir"})
        if unknown:
            raise UserError(f"config.data.target has unknown keys {unknown}.")
        out = {
            "name": target["name"],
            "split": target.get("split", "train"),
            "pp": target.get("pp", self.data.get("pp", "")),
            "data_dir": target.get("data_dir", self.data.get("data_dir")),
        }
        src = pipeline.source(out["name"], out["split"], out["data_dir"])
        if len(src) and feature_cache.uses_randomness(out["pp"], src[0]):
            raise UserError(
                f"config.data.target.pp={out['pp']!r} draws random numbers; the target's "
                "features are cached, so use a deterministic pp."
            )
        return out

    # -------------------------------------------------------------- input pipeline

    def target_rows(self, head: Head) -> np.ndarray | None:
        """The rows of the target split that `head`'s adaptation term reads (None: all).

        Inductive: the rows whose label is one of the head's training classes; the labels
        serve this filter only. Transductive: every row."""
        return self._rows_of(None if self.transductive else head.train_classes, head.name)

    def _rows_of(self, classes: Sequence[int] | None, who: str) -> np.ndarray | None:
        if classes is None or len(classes) == len(self.class_names):
            return None
        t = self.target
        if "label" not in pipeline.source(t["name"], t["split"], t["data_dir"])[0]:
            raise UserError(
                f"config.data.target {t['name']}:{t['split']} has no labels, so its images of "
                f"{who}'s unseen classes cannot be left out (the inductive setting); "
                "use a labelled split, or set config.adaptation.transductive=True."
            )
        names = pipeline.class_names(t["name"], t["data_dir"])
        if list(names) != list(self.class_names):
            raise UserError(
                f"config.data.target {t['name']!r} has classes {list(names)}, not the "
                f"source's {list(self.class_names)}; the inductive filter needs the same ones."
            )
        labels = pipeline.split_labels(t["name"], t["split"], t["data_dir"])
        return np.flatnonzero(np.isin(labels, classes))

    # -------------------------------------------------------------- AdaBN (zeroshot_adabn)

    @functools.cached_property
    def adabn_tower(self) -> Tower:
        """The image tower with BatchNorm statistics of the target images (`zeroshot_adabn`)."""
        rows = self._rows_of(self._adabn_classes, "the heads")
        key, size = self.image_opts["input_key"], int(self.image_opts["batch_size"])
        return zeroshot_adabn.adapted_tower(
            self.image_tower, self.target, rows, key, size, self._cache
        )

    def cached_image_features(self, data_cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The locked image tower's features of a split; with AdaBN, a split of the target
        domain gets those of the adapted tower."""
        if not (self.adabn and zeroshot_adabn.same_domain(data_cfg, self.target)):
            return super().cached_image_features(data_cfg)
        return super().cached_image_features(data_cfg, self.adabn_tower)

    def train_iterator(self, process_index: int, process_count: int) -> grain.DatasetIterator:
        cfg = self.config
        self.cached_class_text  # noqa: B018  (computed here, outside any jit trace)
        common = dict(
            batch_size=cfg.batch_size, process_index=process_index, process_count=process_count
        )
        arrays = self._train_split_features()
        keep = self.trained_classes()
        rows = None if keep is None else np.flatnonzero(np.isin(arrays["label"], keep))
        fields = {"image_feats": arrays["pooled"], **self.texts.cached_fields(arrays)}
        clip_batches = feature_cache.train_dataset(
            fields, seed=cfg.seed, where=self.data["name"], rows=rows, **common
        )
        # A batch holds 1 + 2H feature batches; grain's default read-ahead (500 of them) would
        # hold tens of GB with 15 heads of 1280-d features, so read a few batches ahead only.
        read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=PREFETCH_BATCHES)
        if self.spec is None:  # no adaptation term: training reads no target image
            return iter(clip_batches.map(lambda b: {"source": b}).to_iter_dataset(read))
        n = self.num_heads
        own = {"image_feats": arrays["pooled"], "index": arrays["index"]}
        own_rows = [np.flatnonzero(np.isin(arrays["label"], h.train_classes)) for h in self.heads]
        seeds = [cfg.seed + SOURCE_SEED_OFFSET + i for i in range(n)]
        adapt_source = feature_cache.stacked_train_dataset(
            own, own_rows, seeds, where=self.data["name"], **common
        )
        target = self.cached_image_features(self.target)
        fields = {"image_feats": target["pooled"], "index": target["index"]}  # no labels
        seeds = [cfg.seed + TARGET_SEED_OFFSET + i for i in range(n)]
        where = f"config.data.target {self.target['name']}:{self.target['split']}"
        target = feature_cache.stacked_train_dataset(
            fields, [self.target_rows(h) for h in self.heads], seeds, where=where, **common
        )
        parts = [clip_batches, adapt_source, target]  # batches [B, ...], [B, H, ...], [B, H, ...]
        zipped = grain.experimental.ZipMapDataset(parents=parts)
        names = ("source", "adapt_source", "target")
        return iter(zipped.map(lambda b: dict(zip(names, b, strict=True))).to_iter_dataset(read))

    # -------------------------------------------------------------- init

    def init(self, rng: jax.Array, batch: dict) -> Variables:
        model_rng, disc_rng = jax.random.split(rng)
        variables = super().init(model_rng, batch["source"])
        if self.discriminator is not None:
            discs, rngs = {}, jax.random.split(disc_rng, self.num_heads)
            for i, classes in enumerate(self.predicted_classes):
                width = self.spec.discriminator_input_dim(
                    int(self.head_module.out_dim), len(classes), self.options
                )
                discs[f"head_{i}"] = self.discriminator.init(rngs[i], jnp.zeros((1, width)))[
                    "params"
                ]
            variables["params"] = {**variables["params"], "discriminator": discs}
        return variables

    # -------------------------------------------------------------- loss

    def zeroshot_logits(self, params, model_state, image_feats: jax.Array):
        """Per head, from `image_feats` [B, H, Di] (row b of head h: `[b, h]`): `(logits, emb)`,
        a list of [B, K_h] logits `exp(log_scale) * cos` between the L2-normalised projected
        images and the class-prompt embeddings of the head's `predicted_classes`, and the
        embeddings [H, B, D]. Class embeddings and temperature carry no gradient."""
        head_vars = nn.unbox(head_variables(params, model_state))
        text_feats = jnp.asarray(self.class_text_features(params, model_state, None, False))
        feats = jnp.swapaxes(jnp.asarray(image_feats, jnp.float32), 0, 1)
        out = jax.vmap(self.head_module.apply)(head_vars, feats, text_feats)
        zi = contrastive.l2_normalize(out["image"])
        zt = jax.lax.stop_gradient(contrastive.l2_normalize(out["text"]))
        scale = jax.lax.stop_gradient(jnp.exp(self.logit_scale(out["log_scale"])))
        logits = [
            scale[i] * (zi[i] @ zt[i][np.asarray(classes)].T)
            for i, classes in enumerate(self.predicted_classes)
        ]
        return logits, zi

    def adaptation_loss(self, params, model_state, batch, rng, progress):
        """`(weighted adaptation loss summed over heads, aux averaged over heads)`."""
        if self.spec is None:
            return jnp.zeros((), jnp.float32), {}
        logits_s, emb_s = self.zeroshot_logits(
            params, model_state, batch["adapt_source"]["image_feats"]
        )
        logits_t, emb_t = self.zeroshot_logits(params, model_state, batch["target"]["image_feats"])
        total, auxes = 0.0, []
        for i, r in enumerate(jax.random.split(rng, self.num_heads)):

            def discriminator(h, i=i, r=r):
                variables = {"params": params["discriminator"][f"head_{i}"]}
                return self.discriminator.apply(variables, h, train=True, rngs={"dropout": r})

            inputs = adaptation.AdaptationInputs(
                features_s=emb_s[i],
                features_t=emb_t[i],
                logits_s=logits_s[i],
                logits_t=logits_t[i],
                progress=progress,
                discriminator=discriminator if self.discriminator is not None else None,
            )
            value, aux = self.spec.fn(inputs, self.options)
            total, auxes = total + value, [*auxes, aux]
        aux = {k: jnp.mean(jnp.stack([a[k] for a in auxes])) for k in auxes[0]}
        return WARMUPS[self.warmup](progress) * total, aux

    def loss(self, params, model_state, batch, rng, progress):
        base_rng, adapt_rng = jax.random.split(rng)
        loss, (model_state, metrics) = super().loss(
            params, model_state, batch["source"], base_rng, progress
        )
        adapt, aux = self.adaptation_loss(params, model_state, batch, adapt_rng, progress)
        metrics = {**metrics, **{f"adapt/{self.setting}/{k}": v for k, v in aux.items()}}
        metrics["source_loss"] = loss
        return loss + adapt, (model_state, metrics)
