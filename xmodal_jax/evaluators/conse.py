"""ConSE baseline of the two-tower task: zero-shot accuracy without training anything.

    evals.conse = {'type': 'conse', 'top_t': 10}   # among each split's unseen classes

The locked image tower's own ImageNet-1k classifier gives each test image its top-T ImageNet
classes; their names (`models.imagenet_classes`) and the task's class names are embedded by the
text tower (prompt templates averaged, as for the zero-shot classifier) and each image goes to
the candidate class nearest the probability-weighted mean of its top-T name embeddings
(`evaluation.conse`). The trained heads are not used: the figure is what the pretrained towers
give alone, the baseline of the zero-shot rows.
"""

from __future__ import annotations

import numpy as np

from xmodal_jax.errors import UserError
from xmodal_jax.evaluation import conse
from xmodal_jax.evaluators.zeroshot import TwoTowerEvaluator, class_subset, split_key
from xmodal_jax.models import imagenet_classes


class ConSE(TwoTowerEvaluator):
    """ConSE accuracy among `classes` (default `unseen`) of each main head's split."""

    def __init__(self, name, cfg, fns, mesh, batch_size):
        super().__init__(name, cfg, fns, mesh, batch_size)
        if "image_logits" not in fns:
            raise UserError(
                f"config.evals.{name}: ConSE needs a locked image tower with its ImageNet "
                "classifier (e.g. model.image.pretrained='mobilenet-v2-imagenet', locked=True)."
            )
        self.classes = cfg.get("classes", "unseen")
        self.top_t = int(cfg.get("top_t", 10))
        if not self.setup.class_names:
            raise UserError(f"config.evals.{name}: ConSE needs data.text='class_names'.")
        for _, head in self.heads:
            class_subset(self.setup.class_names, head, self.classes, f"config.evals.{name}")
        self._source_emb: np.ndarray | None = None

    def _embed(self, names: list[str]) -> np.ndarray:
        return self.fns["text_classifier"](names, self.templates)

    def run(self, variables) -> dict[str, float]:
        out = self.fns["image_logits"](self.data_cfg, batch_size=self.batch_size)
        logits, labels = out["logits"], out["label"]
        if logits.shape[1] != 1000:
            raise UserError(
                f"config.evals.{self.name}: the image tower's classifier has {logits.shape[1]} "
                "classes; ConSE here reads ImageNet-1k names, so it needs a 1000-way head."
            )
        if self._source_emb is None:  # the text tower is locked: the same every evaluation
            self._source_emb = self._embed(imagenet_classes.names())
        target_emb = self._embed(list(self.setup.class_names))
        per_head = {}
        for _, head in self.heads:
            classes = class_subset(
                self.setup.class_names, head, self.classes, f"config.evals.{self.name}"
            )
            rows = np.isin(labels, classes)
            pick = conse.conse_predict(
                logits[rows], self._source_emb, target_emb[classes], self.top_t
            )
            accuracy = float(np.mean(classes[pick] == labels[rows]))
            per_head[split_key(head)] = {"accuracy": accuracy, "chance": 1 / len(classes)}
        return self._mean_and_splits(per_head)
