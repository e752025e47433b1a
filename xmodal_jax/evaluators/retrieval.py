"""Image-text retrieval (R@k) of the two-tower task on a split with captions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from xmodal_jax.data import pipeline
from xmodal_jax.errors import UserError
from xmodal_jax.evaluation import retrieval as retrieval_lib
from xmodal_jax.evaluators.zeroshot import TwoTowerEvaluator, split_key


def _field(example: Mapping[str, Any], path: str) -> Any:
    value = example
    for part in path.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            raise UserError(
                f"Example has no field {path!r} (at {part!r}); its fields: {sorted(example)}."
            )
        value = value[part]
    return value


class Retrieval(TwoTowerEvaluator):
    """Image<->text retrieval R@1/5/10 (`ks`) of head 0 on a split with captions: every image
    against every caption of `text_key` (e.g. `captions/text`), at most `max_captions` each."""

    def __init__(self, name, cfg, fns, mesh, batch_size):
        super().__init__(name, cfg, fns, mesh, batch_size)
        self.text_key = cfg.get("text_key", "captions/text")
        self.max_captions = int(cfg.get("max_captions", 5))
        self.ks = tuple(cfg.get("ks", (1, 5, 10)))

    def _captions(self) -> tuple[list[str], np.ndarray]:
        src = pipeline.source(
            self.data_cfg["name"], self.data_cfg["split"], self.data_cfg.get("data_dir")
        )
        texts, owner = [], []
        for i in range(len(src)):
            caps = np.atleast_1d(_field(src[i], self.text_key))[: self.max_captions]
            for c in caps:
                texts.append(c.decode() if isinstance(c, bytes) else str(c))
                owner.append(i)
        return texts, np.asarray(owner)

    def run(self, variables) -> dict[str, float]:
        images = self._images(variables)
        texts, owner = self._captions()
        text_emb = self.fns["text_embeddings"](variables, texts)
        out = {}
        for i, head in self.heads:
            sim = images["emb"][i] @ text_emb[i].T
            out[split_key(head)] = retrieval_lib.retrieval_metrics(sim, owner, self.ks)
        return self._mean_and_splits(out)
