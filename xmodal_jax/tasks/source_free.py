"""Source-free adaptation (SHOT): a source model trained further on unlabelled target data only.

`config.task = 'source_free'`. Liang et al., ICML 2020 (`objectives.adaptation.shot`): the model
starts from a source run's checkpoint, its classifier head stays frozen, and the feature
extractor trains on target batches with `im_weight * IM + beta * CE(logits, pseudo-labels)`.

Config:
- `source = {'workdir': DIR, 'step': None}`: the trainer workdir of the source run (any
  `classification` run, e.g. `experiments/digits/source_only.py`, or a `domain_adaptation` run,
  whose `params/model` is taken); its checkpoint of `step` (None: the newest) gives every
  variable of the model, `params` and `batch_stats` (`load_source`). The model config must be
  the source run's: any missing or misshaped variable is one error. (`config.pretrained` is for
  `pretrained.load` towers and converted files, which know neither trainer checkpoints nor
  LeNet; it must stay unset here.)
- `schedule`: must freeze the head, e.g. `[('head/.*', None), ('.*', 'base')]` (the optimiser
  rules of `transfer.rules`; frozen leaves get no update, so the head stays bit-identical).
- `data`: the target's training split (`name`, `split`, `pp`); its labels are never used by the
  loss, only logged as `train/pseudo_label_accuracy` and `train/accuracy` (diagnostics).
- `shot = {'beta': 0.3, 'im_weight': 1.0}`.

Pseudo-labels, and how they differ from the paper: SHOT computes them once per epoch over the
whole target set, with the model of that moment in eval mode, and keeps them fixed for the
epoch. Here the train step is one jitted step per batch, so they are recomputed at every step
from the current batch alone: a second forward pass of the current model in eval mode (no
dropout, BatchNorm with its running statistics; no gradient) gives the features and
predictions, the centroids of eq. 4 and 6 are formed over the batch's examples only, and the
batch is labelled with them. So the centroids are noisier (a batch of 64 holds about 6 examples
per digit class; use a larger `batch_size` to reduce that), follow the model at every step
rather than every epoch, and a class absent from a batch has no centroid in that step. The
information-maximisation term is on the train-mode forward pass of the same batch, as in the
official code (tim-learn/SHOT `digit/uda_digit.py`).
"""

from __future__ import annotations

import re

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from xmodal_jax import config as config_lib
from xmodal_jax.errors import UserError
from xmodal_jax.objectives.adaptation import shot
from xmodal_jax.objectives.classification import softmax_xent
from xmodal_jax.tasks import Variables
from xmodal_jax.tasks.classification import Classification
from xmodal_jax.transfer import surgery

SOURCE_DEFAULTS = {"workdir": None, "step": None}
HEAD = ("head/kernel", "head/bias")  # the classifier's parameters, frozen by `config.schedule`


def load_source(workdir: str, step: int | None = None) -> tuple[Variables, int]:
    """`(variables, step)` of the checkpoint of `step` (None: the newest) in trainer workdir
    `workdir`: `params` (a domain_adaptation run's `params/model`) and its model state."""
    ckdir = epath.Path(workdir) / "checkpoints"
    steps = (
        sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) if ckdir.exists() else []
    )
    if not steps:
        raise UserError(
            f"config.source.workdir={workdir!r} has no checkpoint in {ckdir}; train the source "
            "model there first (e.g. experiments/digits/source_only.py)."
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"config.source.step={step}: {ckdir} holds the steps {steps}.")
    state = ocp.StandardCheckpointer().restore(ckdir / str(step) / "state")
    params = state["params"]
    if "model" in params and "head" not in params:  # a domain_adaptation run
        params = params["model"]
    variables = {"params": params, **(state.get("model_state") or {})}
    return jax.tree.map(np.asarray, variables), step


def check_head_frozen(config: ml_collections.ConfigDict) -> None:
    """A UserError unless the first `config.schedule` rule matching each head parameter is
    None (frozen)."""
    rules = list(config.get("schedule") or [])
    for path in HEAD:
        rule = next((r for r in rules if re.fullmatch(r[0], path)), None)
        if rule is None or rule[1] is not None:
            raise UserError(
                "config.task='source_free' trains the feature extractor with the source "
                f"classifier frozen, but config.schedule does not freeze {path!r}; set e.g. "
                "config.schedule = [('head/.*', None), ('.*', 'base')]."
            )


class SourceFree(Classification):
    """SHOT on unlabelled target batches from a source model (see module doc)."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
        if (config.get("pretrained") or {}).get("name"):
            raise UserError(
                "config.task='source_free' starts from config.source.workdir (a trainer "
                "workdir); leave config.pretrained unset."
            )
        super().__init__(config, mesh)
        self.source = config_lib.options(config.get("source"), SOURCE_DEFAULTS, "config.source")
        if not self.source["workdir"]:
            raise UserError(
                "config.source.workdir is not set: name the workdir of the source run, e.g. "
                "--config experiments/digits/shot.py:source=workdirs/digits_source_only_m2u_s0."
            )
        self.options = config_lib.options(config.get("shot"), shot.DEFAULTS, "config.shot")
        check_head_frozen(config)
        self.loaded, self.source_step = load_source(self.source["workdir"], self.source["step"])

    def init(self, rng: jax.Array, batch: dict) -> Variables:
        variables = dict(self.model.init({"params": rng, "dropout": rng}, batch["image"]))
        where = f"the source run {self.source['workdir']!r} (step {self.source_step})"
        return dict(surgery.merge(variables, self.loaded, source=where))

    def loss(self, params, model_state, batch, rng, progress):
        del progress
        images = batch["image"]
        ref, _ = self.apply(params, model_state, images, rng, train=False)
        out, model_state = self.apply(params, model_state, images, rng, train=True)
        labels = shot.pseudo_labels(ref["pooled"], ref["logits"])
        im, parts = shot.information_maximization(out["logits"])
        ce = softmax_xent(out["logits"], labels)
        loss = self.options["im_weight"] * im + self.options["beta"] * ce
        metrics = {
            "adapt/im": im,
            "adapt/entropy": parts["entropy"],
            "adapt/diversity": parts["diversity"],
            "adapt/pseudo_label_xent": ce,
        }
        if "label" in batch:  # diagnostics only: the loss never reads target labels
            metrics["pseudo_label_accuracy"] = (labels == batch["label"]).mean()
            metrics["accuracy"] = (out["logits"].argmax(-1) == batch["label"]).mean()
        return loss, (model_state, metrics)
