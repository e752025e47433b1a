"""Image-text matching accuracy of the two-tower task's fused heads."""

from __future__ import annotations

import numpy as np

from xmodal_jax.errors import UserError
from xmodal_jax.evaluation import zeroshot as zs
from xmodal_jax.evaluators.zeroshot import TwoTowerEvaluator, class_subset, split_key


class ImageTextMatching(TwoTowerEvaluator):
    """ITM accuracy of the fused head on class-named data: every test image of `classes`
    (default `seen`) with its own class prompt (a match) and with the most similar other class
    prompt under the head's contrastive similarity (a hard non-match); accuracy of
    `score > 0` over both."""

    def __init__(self, name, cfg, fns, mesh, batch_size):
        super().__init__(name, cfg, fns, mesh, batch_size)
        if not self.setup.class_names or "match_scores" not in fns:
            raise UserError(
                f"config.evals.{name}: ITM evaluation needs data.text='class_names' and a fused "
                "head (config.model.fusion.name)."
            )
        self.classes = cfg.get("classes", "seen")
        for _, head in self.heads:
            class_subset(self.setup.class_names, head, self.classes, f"config.evals.{name}")

    def run(self, variables) -> dict[str, float]:
        images = self._images(variables)
        classifier, text_feats = self.fns["class_embeddings"](variables, self.templates)
        per_head = {}
        for i, head in self.heads:
            where = f"config.evals.{self.name}"
            classes = class_subset(self.setup.class_names, head, self.classes, where)
            rows = np.isin(images["label"], classes)
            labels = images["label"][rows]
            sims = zs.zeroshot_logits(images["emb"][i][rows], classifier[i][classes])
            position = {int(c): k for k, c in enumerate(classes)}
            own = np.asarray([position[int(y)] for y in labels])
            n = np.arange(len(labels))
            sims[n, own] = -np.inf
            hard = np.argmax(sims, axis=1)
            scores = self.fns["match_scores"](
                variables, images["feats"][rows], text_feats[i, classes], head=i
            )
            correct = np.concatenate([scores[n, own] > 0, scores[n, hard] <= 0])
            per_head[split_key(head)] = {"accuracy": float(np.mean(correct))}
        return self._mean_and_splits(per_head)
