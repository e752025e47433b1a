"""Domain adaptation task: labelled source + unlabelled target batches, one adaptation loss.

`config.adaptation.method` names a loss of `xmodal_jax.objectives.adaptation` (dann, mmd/dan,
jmmd/jan, coral, cdan, cdan_e, entropy, mcc, bnm, im, importance); its other keys are that
loss's options (e.g. `weight`). Source and target images go through the model as one batch,
the loss gets features and logits of both halves, and a domain discriminator is added to the
parameters when the loss needs one (`params = {'model': ..., 'discriminator': ...}`).

`config.adaptation.warmup` ramps any loss's trade-off in: `'none'` (default, constant) or
`'sigmoid'`, the factor 2 / (1 + exp(-10 p)) - 1 of Ganin & Lempitsky (ICML 2015) at training
progress p, so an unsupervised target loss (entropy, MCC) cannot act on the random
predictions of the first steps at full weight.

Config: `data.source` and `data.target` (each `name`, `split`, `pp`), `batch_size` per domain.
"""

from __future__ import annotations

from collections.abc import Iterable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from xmodal_jax.data import pipeline
from xmodal_jax.errors import UserError
from xmodal_jax.objectives import adaptation
from xmodal_jax.objectives.adaptation import dann, grl
from xmodal_jax.objectives.classification import softmax_xent
from xmodal_jax.tasks import Variables
from xmodal_jax.tasks.classification import Classification

WARMUPS = {
    "none": lambda progress: 1.0,
    "sigmoid": lambda progress: grl.dann_coefficient(progress),
}


class DomainAdaptation(Classification):
    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
        super().__init__(config, mesh)
        opts = dict(config.get("adaptation", {}) or {})
        method = opts.pop("method", None)
        if method is None:
            raise UserError("config.adaptation.method is not set; name a loss, e.g. 'dann'.")
        try:
            self.spec = adaptation.get_spec(method)
        except ValueError as e:
            raise UserError(f"config.adaptation.method: {e}") from None
        self.warmup = opts.pop("warmup", "none") or "none"
        if self.warmup not in WARMUPS:
            raise UserError(
                f"config.adaptation.warmup={self.warmup!r}; use one of {sorted(WARMUPS)}."
            )
        if self.warmup != "none" and self.spec.replaces_source_loss:
            raise UserError(
                f"config.adaptation.warmup={self.warmup!r}: {method} replaces the source "
                "cross-entropy, so ramping it would ramp the classification loss; use 'none'."
            )
        self.options = opts
        needs_disc = self.spec.discriminator_input_dim is not None
        self.discriminator = dann.make_discriminator(opts) if needs_disc else None
        for domain in ("source", "target"):
            if domain not in config.data:
                raise UserError(f"config.data.{domain} is missing; set name, split and pp.")

    def train_iterator(self, process_index: int, process_count: int) -> grain.DatasetIterator:
        return pipeline.paired_iterator(
            self.config.data.source,
            self.config.data.target,
            batch_size=self.config.batch_size,
            seed=self.config.seed,
            process_index=process_index,
            process_count=process_count,
        )

    def init(self, rng: jax.Array, batch: dict) -> Variables:
        model_rng, disc_rng = jax.random.split(rng)
        variables = super().init(model_rng, batch["source"])
        params = {"model": variables.pop("params")}
        if self.discriminator is not None:
            out = self.model.apply(
                {"params": params["model"], **variables}, batch["source"]["image"]
            )
            width = self.spec.discriminator_input_dim(
                out["pooled"].shape[-1], out["logits"].shape[-1], self.options
            )
            params["discriminator"] = self.discriminator.init(disc_rng, jnp.zeros((1, width)))[
                "params"
            ]
        return {"params": params, **variables}

    def loss(self, params, model_state, batch, rng, progress):
        source, target = batch["source"], batch["target"]
        n = source["image"].shape[0]
        images = jnp.concatenate([source["image"], target["image"]])
        model_rng, disc_rng = jax.random.split(rng)
        out, model_state = self.apply(params["model"], model_state, images, model_rng, train=True)
        features, logits = out["pooled"], out["logits"]

        def discriminator(h):
            variables = {"params": params["discriminator"]}
            return self.discriminator.apply(variables, h, train=True, rngs={"dropout": disc_rng})

        inputs = adaptation.AdaptationInputs(
            features_s=features[:n],
            features_t=features[n:],
            logits_s=logits[:n],
            logits_t=logits[n:],
            labels_s=source["label"],
            progress=progress,
            discriminator=discriminator if self.discriminator is not None else None,
        )
        transfer_loss, aux = self.spec.fn(inputs, self.options)
        loss = WARMUPS[self.warmup](progress) * transfer_loss
        if not self.spec.replaces_source_loss:
            loss = loss + softmax_xent(logits[:n], source["label"])
        metrics = {f"adapt/{k}": v for k, v in aux.items()}
        metrics["accuracy"] = (logits[:n].argmax(-1) == source["label"]).mean()
        return loss, (model_state, metrics)

    def predict(self, variables: Variables, batch: dict) -> dict[str, jax.Array]:
        variables = {**variables, "params": variables["params"]["model"]}
        return self.model.apply(variables, batch["image"], train=False)

    def adapt_batch_norm(self, variables: Variables, images: Iterable[np.ndarray]) -> Variables:
        inner = {**variables, "params": variables["params"]["model"]}
        return {**super().adapt_batch_norm(inner, images), "params": variables["params"]}

    def apply_train_bn(self, variables: Variables, batch: dict, norm_params: dict | None = None):
        inner = {**variables, "params": variables["params"]["model"]}
        return super().apply_train_bn(inner, batch, norm_params)
