"""Zero-shot adaptation: a two-tower zero-shot classifier adapted to an unlabelled shifted
domain, the class-name text anchors fixed.

The task is `two_tower` (`TwoTower`) with one more input and one more loss term:
- source: the labelled training split of the head's seen classes (`config.data`, as in the
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

Fixed text anchors: the text tower must be locked (its class-prompt features are cached) and
the adaptation logits take the class embeddings and the temperature without gradient, so the
adaptation term moves only the image projection (and the discriminator); otherwise entropy
could be lowered by raising the temperature alone.

Settings (`config.adaptation.transductive`), never mixed in one run:
- inductive (default): the target split is read only for the images of the head's seen
  classes, and the logits run over the seen classes' names only, so no unseen-class image or
  name enters training. The target labels are used for that filtering only (the closed-set
  assumption of the inductive setting: the unlabelled target domain holds the classes trained
  on); no batch carries them. Evaluate on the shifted *test* split (evaluators' `dataset` /
  `split` / `pp`).
- transductive (`transductive=True`): every target image is read, unseen classes included, and
  the logits run over every class name the head scores (seen and unseen). Train metrics are
  logged under `adapt/transductive/` (inductive: `adapt/inductive/`), so the setting is named
  in every record.
The test-time setting (adapting online on the test stream, e.g. TENT or AdaBN on the image
tower) is not this task.

One head per run (`config.heads.unseen` with one split, no control or calibration head): the
classes a head may predict, and so which target rows are read, differ between heads.
Parameters: those of `two_tower` plus `discriminator` for the adversarial losses. Batches:
`{'source': two-tower batch, 'target': {'image_feats', 'index'}}` (`index`: the target row).
"""

from __future__ import annotations

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
from xmodal_jax.tasks import Variables, feature_cache
from xmodal_jax.tasks.domain_adaptation import WARMUPS
from xmodal_jax.tasks.two_tower import TwoTower
from xmodal_jax.tasks.two_tower_predict import head_variables

OWN_KEYS = ("method", "warmup", "transductive")
TARGET_SEED_OFFSET = 7919  # the target's shuffle seed: config.seed + this (as domain_adaptation)


class ZeroShotAdaptation(TwoTower):
    """See the module docstring."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
        super().__init__(config, mesh)
        opts = dict(config.get("adaptation") or {})
        method = opts.get("method")
        if not method:
            raise UserError("config.adaptation.method is not set; name a loss, e.g. 'entropy'.")
        try:
            self.spec = adaptation.get_spec(method)
        except ValueError as e:
            raise UserError(f"config.adaptation.method: {e}") from None
        if self.spec.replaces_source_loss:
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
        self.options = {k: v for k, v in opts.items() if k not in OWN_KEYS}
        try:  # an unknown option is one error now, not inside the first traced step
            resolve_config(self.options, self.spec.defaults, method)
        except ValueError as e:
            raise UserError(f"config.adaptation: {e}") from None
        self._check_model()
        self.target = self._target_config()
        head = self.heads[0]
        every = tuple(range(len(self.class_names)))
        # The classes the adaptation logits run over: the seen classes' names only (inductive),
        # every class the head scores (transductive).
        self.predicted_classes = every if self.transductive else tuple(head.train_classes)
        needs_disc = self.spec.discriminator_input_dim is not None
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
        if self.num_heads != 1:
            raise UserError(
                f"config.heads gives {self.num_heads} heads; zeroshot_adaptation trains one "
                "head per run (one split in config.heads.unseen, no control or calibration)."
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

    def target_rows(self) -> np.ndarray | None:
        """The rows of the target split that training reads (None: all of them).

        Inductive: the rows whose label is one of the head's seen classes; the labels serve
        this filter only. Transductive: every row."""
        seen = self.heads[0].train_classes
        if self.transductive or len(seen) == len(self.class_names):
            return None
        t = self.target
        names = pipeline.class_names(t["name"], t["data_dir"])
        if list(names) != list(self.class_names):
            raise UserError(
                f"config.data.target {t['name']!r} has classes {list(names)}, not the "
                f"source's {list(self.class_names)}; the inductive filter needs the same ones."
            )
        labels = pipeline.split_labels(t["name"], t["split"], t["data_dir"])
        return np.flatnonzero(np.isin(labels, seen))

    def train_iterator(self, process_index: int, process_count: int) -> grain.DatasetIterator:
        cfg = self.config
        self.cached_class_text  # noqa: B018  (computed here, outside any jit trace)
        common = dict(
            batch_size=cfg.batch_size, process_index=process_index, process_count=process_count
        )
        arrays = self._train_split_features()
        keep = self.trained_classes()
        if keep is not None:
            rows = np.flatnonzero(np.isin(arrays["label"], keep))
            arrays = {k: v[rows] for k, v in arrays.items()}
        fields = {"image_feats": arrays["pooled"], **self.texts.cached_fields(arrays)}
        source = feature_cache.train_dataset(
            fields, seed=cfg.seed, where=self.data["name"], **common
        )
        target = self.cached_image_features(self.target)
        fields = {"image_feats": target["pooled"], "index": target["index"]}  # no labels
        rows = self.target_rows()
        if rows is not None:
            fields = {k: v[rows] for k, v in fields.items()}
        target = feature_cache.train_dataset(
            fields,
            seed=cfg.seed + TARGET_SEED_OFFSET,
            where=f"config.data.target {self.target['name']}:{self.target['split']}",
            **common,
        )
        zipped = grain.experimental.ZipMapDataset(parents=[source, target])
        return iter(zipped.map(lambda st: {"source": st[0], "target": st[1]}).to_iter_dataset())

    # -------------------------------------------------------------- init

    def init(self, rng: jax.Array, batch: dict) -> Variables:
        model_rng, disc_rng = jax.random.split(rng)
        variables = super().init(model_rng, batch["source"])
        if self.discriminator is not None:
            width = self.spec.discriminator_input_dim(
                int(self.head_module.out_dim), len(self.predicted_classes), self.options
            )
            disc = self.discriminator.init(disc_rng, jnp.zeros((1, width)))["params"]
            variables["params"] = {**variables["params"], "discriminator": disc}
        return variables

    # -------------------------------------------------------------- loss

    def zeroshot_logits(self, params, model_state, image_feats: jax.Array):
        """`(logits [B, K], embeddings [B, D])` of one head: `exp(log_scale) * cos` between the
        L2-normalised projected images and the class-prompt embeddings of the K
        `predicted_classes`; class embeddings and temperature carry no gradient."""
        head_vars = head_variables(params, model_state)
        text_feats = self.class_text_features(params, model_state, None, False)
        out = self.heads_module.apply(head_vars, image_feats, text_feats)
        zi = contrastive.l2_normalize(out["image"][0])
        zt = contrastive.l2_normalize(out["text"][0])[np.asarray(self.predicted_classes)]
        scale = jnp.exp(self.logit_scale(out["log_scale"][0]))
        logits = jax.lax.stop_gradient(scale) * (zi @ jax.lax.stop_gradient(zt).T)
        return logits, zi

    def adaptation_loss(self, params, model_state, batch, rng, progress):
        """`(weighted adaptation loss, aux)` of a `{'source', 'target'}` batch."""
        logits_s, emb_s = self.zeroshot_logits(params, model_state, batch["source"]["image_feats"])
        logits_t, emb_t = self.zeroshot_logits(params, model_state, batch["target"]["image_feats"])

        def discriminator(h):
            variables = {"params": params["discriminator"]}
            return self.discriminator.apply(variables, h, train=True, rngs={"dropout": rng})

        inputs = adaptation.AdaptationInputs(
            features_s=emb_s,
            features_t=emb_t,
            logits_s=logits_s,
            logits_t=logits_t,
            progress=progress,
            discriminator=discriminator if self.discriminator is not None else None,
        )
        value, aux = self.spec.fn(inputs, self.options)
        return WARMUPS[self.warmup](progress) * value, aux

    def loss(self, params, model_state, batch, rng, progress):
        base_rng, adapt_rng = jax.random.split(rng)
        loss, (model_state, metrics) = super().loss(
            params, model_state, batch["source"], base_rng, progress
        )
        adapt, aux = self.adaptation_loss(params, model_state, batch, adapt_rng, progress)
        metrics = {**metrics, **{f"adapt/{self.setting}/{k}": v for k, v in aux.items()}}
        metrics["source_loss"] = loss
        return loss + adapt, (model_state, metrics)
