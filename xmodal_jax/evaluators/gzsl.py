"""Generalised zero-shot evaluation of the two-tower task, with calibrated stacking."""

from __future__ import annotations

import numpy as np

from xmodal_jax.errors import UserError
from xmodal_jax.evaluation import zeroshot as zs
from xmodal_jax.evaluators.zeroshot import TwoTowerEvaluator, split_key


class GeneralizedZeroShot(TwoTowerEvaluator):
    """Generalised zero-shot with calibrated stacking: test images of all classes, predictions
    over all class names, a penalty gamma subtracted from seen-class scores.

    gamma is chosen per split on `val_split` (a part of the *training* split held out of
    training, e.g. `train[90%:]` when `data.split='train[:90%]'`), using only images of the
    split's seen classes and the split's calibration head, trained without
    `config.heads.calibration_holdout` of those seen classes (the pseudo-unseen ones): gamma
    maximises the harmonic mean of pseudo-seen and pseudo-unseen accuracy
    (`evaluation.zeroshot.choose_calibration`). Test images never choose anything. Reports
    `seen`, `unseen`, `harmonic_mean` (per-class mean accuracies, mean over splits), `gamma`, and
    `harmonic_mean_uncalibrated` (gamma = 0)."""

    def __init__(self, name, cfg, fns, mesh, batch_size):
        super().__init__(name, cfg, fns, mesh, batch_size)
        if "val_split" not in cfg:
            raise UserError(
                f"config.evals.{name} needs val_split: a part of the training split that "
                "training does not see (e.g. data.split='train[:90%]', val_split='train[90%:]')."
            )
        if cfg["val_split"] == self.setup.data["split"]:
            raise UserError(
                f"config.evals.{name}.val_split equals data.split; hold it out of training."
            )
        self.val_cfg = {**self.data_cfg, "split": cfg["val_split"]}
        self.calibration = {}
        for i, h in enumerate(self.setup.heads):
            if h.role == "calibration":
                self.calibration[h.split] = (i, h)
        missing = [h.name for _, h in self.heads if h.split not in self.calibration]
        if missing:
            raise UserError(
                f"config.evals.{name}: no calibration head for {missing}; set "
                "config.heads.calibration_holdout (e.g. 2)."
            )

    def run(self, variables) -> dict[str, float]:
        test, val = self._images(variables), self._images(variables, self.val_cfg)
        classifier, _ = self.fns["class_embeddings"](variables, self.templates)
        per_head = {}
        for i, head in self.heads:
            j, calib = self.calibration[head.split]
            rows = np.isin(val["label"], head.train_classes)
            val_scores = zs.zeroshot_logits(val["emb"][j][rows], classifier[j])
            gamma = zs.choose_calibration(
                val_scores, val["label"][rows], calib.train_classes, calib.pseudo_unseen
            )
            scores = zs.zeroshot_logits(test["emb"][i], classifier[i])
            args = (scores, test["label"], head.train_classes, head.unseen)
            calibrated = zs.gzsl_metrics(*args, gamma=gamma)
            plain = zs.gzsl_metrics(*args, gamma=0.0)
            per_head[split_key(head)] = {
                "seen": calibrated["seen_accuracy"],
                "unseen": calibrated["unseen_accuracy"],
                "harmonic_mean": calibrated["harmonic_mean"],
                "gamma": gamma,
                "harmonic_mean_uncalibrated": plain["harmonic_mean"],
            }
        return self._mean_and_splits(per_head)
