"""Zero-shot evaluators of the two-tower task (seen, unseen, permuted-names control), and the
base class of its other evaluators (`gzsl`, `retrieval`, `itm`: modules of their own here).

Each evaluator scores every head of its kind (`heads`: `main`, `control` or `calibration`; see
`two_tower.make_heads`) and reports the mean over them plus one value per split, e.g.
`eval/zeroshot_unseen/accuracy` and `eval/zeroshot_unseen/split_0/accuracy`. Config keys shared
by all: `dataset`, `split` (default `test`), `pp` (default: the training `data.pp`), `templates`
(default: the training templates).

    evals.seen = {'type': 'zeroshot', 'classes': 'seen'}     # among a head's seen classes
    evals.zeroshot_unseen = {'type': 'zeroshot_unseen'}      # among its unseen classes
    evals.zeroshot_unseen_control = {'type': 'zeroshot_control'}  # same, permuted-name heads
    evals.gzsl = {'type': 'gzsl', 'val_split': 'train[90%:]'}
    evals.retrieval = {'type': 'retrieval', 'text_key': 'captions/text'}
    evals.itm = {'type': 'itm'}

Zero-shot evaluators also report `chance` (1 / number of candidate classes). Their `plot(out_dir)`
(called by the trainer with the other plots) draws `plots/zeroshot_<name>.png`: per-split bars,
their mean, chance and, for `zeroshot_unseen`, the control.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from xmodal_jax.data import pipeline
from xmodal_jax.errors import UserError
from xmodal_jax.evaluation import zeroshot as zs
from xmodal_jax.train import plots


def class_subset(
    class_names: Sequence[str], head, classes: str | Sequence[str], where: str
) -> np.ndarray:
    """Class indices of `classes` for `head`: 'seen' (the classes it trains on; for a
    calibration head also its pseudo-unseen ones), 'unseen', 'pseudo_unseen' (the seen classes a
    calibration head does not train on), 'all', or a list of names."""
    if isinstance(classes, str):
        if classes == "all":
            return np.arange(len(class_names))
        if classes == "pseudo_unseen":
            if not head.pseudo_unseen:
                raise UserError(
                    f"{where}: classes='pseudo_unseen' needs calibration heads; set "
                    "heads='calibration' and config.heads.calibration_holdout."
                )
            return np.asarray(head.pseudo_unseen)
        if classes == "seen":
            return np.asarray(sorted(head.train_classes + head.pseudo_unseen))
        if classes == "unseen":
            if not head.unseen:
                raise UserError(
                    f"{where}: classes='unseen' but config.heads.unseen is empty; give the "
                    "held-out classes."
                )
            return np.asarray(head.unseen)
        raise UserError(
            f"{where}.classes={classes!r}: use 'seen', 'unseen', 'pseudo_unseen', 'all' or a "
            "list of class names."
        )
    index = {n: i for i, n in enumerate(class_names)}
    bad = [n for n in classes if n not in index]
    if bad:
        raise UserError(f"{where}.classes: unknown {bad}; use {list(class_names)}.")
    return np.asarray([index[n] for n in classes])


def split_key(head) -> str:
    return f"split_{head.split}" if head.unseen else head.name


class TwoTowerEvaluator:
    """Shared set-up: checks the prediction functions, resolves the data config and the heads
    to score. `fns` are a two-tower task's (`image_embeddings`, `class_embeddings`,
    `text_embeddings`, `match_scores` with a fused head, and `zeroshot`: its
    `evaluation.zeroshot.ZeroShotSetup`)."""

    roles: tuple[str, ...] = ("main",)

    def __init__(
        self, name: str, cfg: Mapping[str, Any], fns: Mapping[str, Any], mesh: Mesh, batch_size: int
    ):
        if "zeroshot" not in fns:
            raise UserError(
                f"config.evals.{name}.type={cfg.get('type')!r} evaluates a two-tower model; "
                "set config.task='two_tower'."
            )
        self.name, self.cfg, self.fns, self.mesh = name, cfg, fns, mesh
        self.setup: zs.ZeroShotSetup = fns["zeroshot"]
        self.batch_size = batch_size
        self.data_cfg = pipeline.eval_data(cfg, f"config.evals.{name}", default=self.setup.data)
        self.templates = tuple(cfg.get("templates") or self.setup.templates)
        roles = cfg.get("heads", self.roles)
        self.roles = (roles,) if isinstance(roles, str) else tuple(roles)
        self.heads = [(i, h) for i, h in enumerate(self.setup.heads) if h.role in self.roles]
        if not self.heads:
            raise UserError(
                f"config.evals.{name}: the task has no {'/'.join(self.roles)} heads; "
                "check config.heads (control=True, calibration_holdout, ...)."
            )

    def _images(self, variables, data_cfg=None) -> dict[str, np.ndarray]:
        return self.fns["image_embeddings"](
            variables, data_cfg or self.data_cfg, batch_size=self.batch_size, mesh=self.mesh
        )

    def _mean_and_splits(self, per_head: dict[str, dict[str, float]]) -> dict[str, float]:
        out = {}
        for metric in next(iter(per_head.values())):
            out[metric] = float(np.mean([v[metric] for v in per_head.values()]))
        if len(per_head) > 1:
            for key, values in per_head.items():
                out.update({f"{key}/{m}": v for m, v in values.items()})
        return out


class ZeroShot(TwoTowerEvaluator):
    """Zero-shot accuracy among `classes` (`seen`, `unseen`, `all` or a list of names): test
    images of those classes, each head's classifier from the class names x templates.
    `score='itm'` ranks the classes by the fused head's match score instead of the cosine."""

    default_classes = "all"

    def __init__(self, name, cfg, fns, mesh, batch_size):
        super().__init__(name, cfg, fns, mesh, batch_size)
        self.classes = cfg.get("classes", self.default_classes)
        self.score = cfg.get("score", "cosine")
        if self.score not in ("cosine", "itm"):
            raise UserError(f"config.evals.{name}.score={self.score!r}: use 'cosine' or 'itm'.")
        if not self.setup.class_names:
            raise UserError(f"config.evals.{name}: zero-shot needs data.text='class_names'.")
        if self.score == "itm" and "match_scores" not in fns:
            raise UserError(
                f"config.evals.{name}.score='itm' needs a fused head (config.model.fusion.name)."
            )
        self.last: dict[str, float] = {}
        self.last_control: dict[str, float] = {}
        for _, head in self.heads:
            self._class_subset(head)  # fail early on bad class lists

    def _class_subset(self, head) -> np.ndarray:
        return class_subset(self.setup.class_names, head, self.classes, f"config.evals.{self.name}")

    def _accuracies(self, variables, heads, images, classifier, text_feats):
        out = {}
        for i, head in heads:
            classes = self._class_subset(head)
            rows = np.isin(images["label"], classes)
            if not rows.any():
                raise UserError(
                    f"config.evals.{self.name}: {self.data_cfg['name']}:{self.data_cfg['split']} "
                    f"has no example of classes {classes.tolist()}."
                )
            if self.score == "itm":
                scores = self.fns["match_scores"](
                    variables, images["feats"][rows], text_feats[i, classes], head=i
                )
            else:
                scores = zs.zeroshot_logits(images["emb"][i][rows], classifier[i][classes])
            pred = classes[np.argmax(scores, axis=1)]
            out[split_key(head)] = {"accuracy": float(np.mean(pred == images["label"][rows]))}
        return out

    def run(self, variables) -> dict[str, float]:
        images = self._images(variables)
        classifier, text_feats = self.fns["class_embeddings"](variables, self.templates)
        per_head = self._accuracies(variables, self.heads, images, classifier, text_feats)
        self.last = {k: v["accuracy"] for k, v in per_head.items()}
        controls = [(i, h) for i, h in enumerate(self.setup.heads) if h.role == "control"]
        if "main" in self.roles and controls:  # kept for the plot's control line only
            found = self._accuracies(variables, controls, images, classifier, text_feats)
            self.last_control = {k: v["accuracy"] for k, v in found.items()}
        self.chance = float(np.mean([1 / len(self._class_subset(h)) for _, h in self.heads]))
        return {**self._mean_and_splits(per_head), "chance": self.chance}

    def plot(self, out_dir: str) -> list[str]:
        """Per-split accuracy bars with their mean, chance and (if trained) the control."""
        if not self.last:
            return []
        path = os.path.join(out_dir, f"zeroshot_{self.name}.png")
        plot_splits(
            self.last, self.chance, path, title=f"{self.name} ({self.classes} classes)",
            control=self.last_control or None,
        )  # fmt: skip
        return [path]


class ZeroShotUnseen(ZeroShot):
    """`zeroshot` among each split's unseen classes (those never trained on)."""

    default_classes = "unseen"


class ZeroShotControl(ZeroShot):
    """`zeroshot_unseen` on the heads trained with permuted class names: accuracy that does not
    come from what the names mean (expected near chance)."""

    default_classes = "unseen"
    roles = ("control",)


def plot_splits(
    accuracy: Mapping[str, float],
    chance: float,
    path: str,
    *,
    title: str,
    control: Mapping[str, float] | None = None,
) -> None:
    """Bars per split, a line at their mean, at chance and (dashed) at the control's mean."""
    names = list(accuracy)
    values = [accuracy[n] for n in names]
    fig = plots.figure(figsize=(1.6 + 0.9 * len(names), 3.6))
    ax = fig.subplots()
    x = np.arange(len(names))
    width = 0.38 if control else 0.6
    ax.bar(x - (width / 2 if control else 0), values, width, label="zero-shot", color="C0")
    if control:
        ax.bar(
            x + width / 2, [control.get(n, np.nan) for n in names], width,
            label="permuted names", color="C7",
        )  # fmt: skip
        ax.axhline(np.mean(list(control.values())), color="C7", ls="--", lw=1,
                   label=f"control mean {np.mean(list(control.values())):.3f}")  # fmt: skip
    ax.axhline(np.mean(values), color="C0", lw=1, label=f"mean {np.mean(values):.3f}")
    ax.axhline(chance, color="C3", ls=":", lw=1.5, label=f"chance {chance:.3f}")
    ax.set_xticks(x, names, rotation=30, fontsize=8)
    ax.set(ylim=(0, 1), ylabel="accuracy", title=title)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
