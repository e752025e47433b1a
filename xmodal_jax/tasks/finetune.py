"""Fine-tuning from pretrained weights, with a transfer regulariser added to the loss.

`config.task = 'finetune'`. Supervised classification (`Classification`) whose model starts from
pretrained weights and whose loss is `cross-entropy + regulariser`:

* `config.pretrained` (read by `Classification`; `tasks.classification.PRETRAINED_DEFAULTS`):
  `name` (a `pretrained.load` name or path), `reinit` (regexes of the model's variables it
  initialises itself, default the new `params/head/`), `skip` (regexes of checkpoint entries
  dropped, default the old `params/head/`). The loaded variables go through
  `transfer.surgery.merge`, so any other mismatch is one error listing every culprit.
* `config.regularizer`: `name` in `none`, `l1`, `l2`, `l2sp`, `delta`, `bss` and its options
  (`objectives.regularizers.REGULARIZERS` lists them with their defaults and the inputs each
  reads). `l2sp` and `delta` pull towards the starting
  point: the merged pretrained variables, held by the task as constants (not parameters, no
  optimiser state). `delta` compares the outputs of the modules named in `layers` with those of
  the pretrained model (eval mode, pretrained BatchNorm statistics) on the same batch; with
  `attention`, channels are weighted by DELTA's supervised attention, computed once when the
  task is built (see `channel_attention`).
* `config.data.per_class` (optional): train on a fixed labelled subset of that many examples of
  every class, drawn with `config.data.subset_seed` (default 0) independently of the split order.

Logged: `train/regularizer` (the term added to the loss), `train/xent`, and the regulariser's
unweighted parts under `train/reg/...`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from xmodal_jax import config as config_lib
from xmodal_jax.data import pipeline, preprocess
from xmodal_jax.errors import UserError
from xmodal_jax.objectives import regularizers
from xmodal_jax.objectives.classification import softmax_xent
from xmodal_jax.objectives.regularizers import RegularizerInputs, delta
from xmodal_jax.tasks import Variables
from xmodal_jax.tasks.classification import Classification
from xmodal_jax.transfer import checkpoint_io
from xmodal_jax.tree_paths import flatten_with_paths, map_with_paths


def _as_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


def regularizer_options(cfg: Any) -> tuple[str, dict[str, Any]]:
    """`(name, options)` of `config.regularizer` over its registered defaults (`objectives.
    regularizers.REGULARIZERS`); a bad name or key is one error."""
    given = _as_dict(cfg)
    name = given.pop("name", "none")
    spec = regularizers.get_regularizer(name)
    return name, config_lib.options(given, spec.defaults, f"config.regularizer ({name})")


def stratified_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `per_class` examples of every class, drawn without replacement."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise UserError(
                f"config.data.per_class={per_class} but class {int(c)} has only {len(idx)} "
                "training examples; lower per_class."
            )
        chosen.append(rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def _module_output(intermediates: Mapping[str, Any], path: str) -> jax.Array:
    node = intermediates
    for part in path.split("/"):
        node = node[part]
    return node["__call__"][0]


class FineTune(Classification):
    """Classification from a pretrained start, plus `config.regularizer` (module doc)."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
        super().__init__(config, mesh)
        self.reg_name, self.reg = regularizer_options(config.get("regularizer"))
        self.reg_spec = regularizers.get_regularizer(self.reg_name)
        data = _as_dict(config.data)
        self.src = pipeline.source(data["name"], data["split"], data.get("data_dir"))
        self.indices = None
        if data.get("per_class"):
            labels = pipeline.split_labels(data["name"], data["split"], data.get("data_dir"))
            self.indices = stratified_subset(
                labels, int(data["per_class"]), int(data.get("subset_seed", 0))
            )
        example = preprocess.compose(data.get("pp", ""))(dict(self.src[0]))
        self._dummy = np.zeros((1, *np.shape(example["image"])), np.float32)
        self._load_start()
        self.layers = tuple(self.reg["layers"]) if "feature_maps" in self.reg_spec.needs else ()
        self._check_layers()
        self.attention, self.attention_head = None, None
        if "channel_attention" in self.reg_spec.needs and self.reg["attention"]:
            self.attention = self.channel_attention()

    # ------------------------------------------------------------------ starting point

    def _load_start(self) -> None:
        """The starting point the pretrained variables give this model (flat, head excluded)."""
        self.start_params, self.start_state = None, None
        if self.loaded is None:
            if {"pretrained_params", "pretrained_feature_maps"} & set(self.reg_spec.needs):
                raise UserError(
                    f"config.regularizer.name={self.reg_name!r} needs a starting point; set "
                    "config.pretrained.name (e.g. 'mobilenet-v2-imagenet')."
                )
            return
        abstract = jax.eval_shape(
            lambda x: self.model.init({"params": jax.random.key(0)}, x), self._dummy
        )
        merged = self.merge_pretrained(nn.unbox(abstract))
        loaded_only = lambda tree: {
            p: np.asarray(v)
            for p, v in flatten_with_paths(tree).items()
            if not isinstance(v, jax.ShapeDtypeStruct)
        }
        # Flat {path: value} of every variable the checkpoint provides (the new head excluded).
        self.start_params = loaded_only(merged.pop("params"))
        self.start_state = {k: loaded_only(v) for k, v in merged.items()}

    def start_tree(self, params: Any) -> Any:
        """`params` with every leaf the checkpoint provides replaced by its starting value."""
        flat = self.start_params or {}
        return map_with_paths(
            lambda p, x: jnp.asarray(flat[p]) if p in flat else jax.lax.stop_gradient(x), params
        )

    def _start_variables(self, params: Any, model_state: Variables) -> Variables:
        state = {
            k: map_with_paths(
                lambda p, x, k=k: (
                    jnp.asarray(self.start_state[k][p]) if p in self.start_state.get(k, {}) else x
                ),
                v,
            )
            for k, v in model_state.items()
        }
        return {"params": self.start_tree(params), **state}

    # ------------------------------------------------------------------ forward passes

    def _check_layers(self) -> None:
        if "feature_maps" not in self.reg_spec.needs:
            return
        convs = sorted(p[: -len("/kernel")] for p in self.start_params if p.endswith("/kernel"))
        bad = [layer for layer in self.layers if f"{layer}/kernel" not in self.start_params]
        if not self.layers or bad:
            raise UserError(
                f"config.regularizer.layers={list(self.layers)}: DELTA needs pretrained modules "
                f"with a kernel{'; not found: ' + str(bad) if bad else ''}. Valid names look "
                f"like {convs[:4]} ... {convs[-2:]}."
            )

    def _capture(self, module: Any, method: str) -> bool:
        return method == "__call__" and "/".join(module.path) in self.layers

    def forward(
        self, variables: Variables, images: jax.Array, rng: jax.Array | None, train: bool
    ) -> tuple[dict[str, jax.Array], Variables, dict[str, jax.Array]]:
        """Model outputs, updated non-parameter state and the captured `layers` outputs."""
        mutable = list(variables) if train else []
        mutable = [k for k in mutable if k != "params"]
        kwargs: dict[str, Any] = {"train": train}
        if rng is not None:
            kwargs["rngs"] = {"dropout": rng}
        if self.layers:
            kwargs["capture_intermediates"] = self._capture
            mutable.append("intermediates")
        if not mutable:
            return self.model.apply(variables, images, **kwargs), {}, {}
        out, state = self.model.apply(variables, images, mutable=mutable, **kwargs)
        state = dict(state)
        inter = state.pop("intermediates", {})
        return out, state, {layer: _module_output(inter, layer) for layer in self.layers}

    # ------------------------------------------------------------------ loss

    def regularizer(
        self,
        params: Any,
        out: Mapping[str, jax.Array],
        feature_maps: Mapping[str, jax.Array],
        reference_maps: Mapping[str, jax.Array] | None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The weighted term added to the loss and the regulariser's unweighted parts: the
        registered regulariser, given the inputs it declares it needs."""
        available = {
            "params": lambda: params,
            "pretrained_params": lambda: checkpoint_io.unflatten(self.start_params),
            "feature_maps": lambda: feature_maps,
            "pretrained_feature_maps": lambda: reference_maps,
            "channel_attention": lambda: self.attention,
            "features": lambda: out["pooled"],
        }
        inputs = RegularizerInputs(**{k: available[k]() for k in self.reg_spec.needs})
        return self.reg_spec.fn(inputs, self.reg)

    def loss(self, params, model_state, batch, rng, progress):
        del progress
        images, labels = batch["image"], batch["label"]
        variables = {"params": params, **model_state}
        out, new_state, maps = self.forward(variables, images, rng, train=True)
        model_state = {**model_state, **new_state}
        reference = None
        if "pretrained_feature_maps" in self.reg_spec.needs:
            _, _, reference = self.forward(
                self._start_variables(params, model_state), images, None, train=False
            )
            reference = jax.lax.stop_gradient(reference)
        logits = out["logits"]
        xent = softmax_xent(logits, labels, label_smoothing=self.config.get("label_smoothing", 0.0))
        reg, parts = self.regularizer(params, out, maps, reference)
        metrics = {
            "accuracy": (logits.argmax(-1) == labels).mean(),
            "xent": xent,
            "regularizer": reg,
            **{f"reg/{k}": v for k, v in parts.items()},
        }
        return xent + reg, (model_state, metrics)

    # ------------------------------------------------------------------ data

    def train_iterator(self, process_index: int, process_count: int) -> grain.DatasetIterator:
        if self.indices is not None and len(self.indices) < self.config.batch_size:
            raise UserError(
                f"The labelled subset has {len(self.indices)} examples, fewer than the batch "
                f"{self.config.batch_size}; lower batch_size or raise config.data.per_class."
            )
        return super().train_iterator(process_index, process_count)

    # ------------------------------------------------------------------ DELTA attention

    def channel_attention(self) -> dict[str, np.ndarray]:
        """DELTA's supervised channel attention, once, from the pretrained model.

        As in the DELTA paper: a new head is fitted on the pretrained model's pooled features of
        `attention_batches` training batches (cross-entropy, Adam); for every channel j of every
        layer, the kernel's output channel j is zeroed and the increase of that model's loss is
        measured (`delta.channel_loss_increase`), averaged over the batches, standardised and
        turned into `softmax(z / temperature)` (`delta.channel_attention`).
        """
        o = self.reg
        it = self.train_iterator(0, 1)
        batches = [next(it) for _ in range(int(o["attention_batches"]))]
        variables = nn.unbox(jax.jit(self.init)(jax.random.key(0), batches[0]))
        params = self.start_tree(variables.pop("params"))
        state = variables
        head = {k: v for k, v in params.items() if k == "head"}
        if set(head.get("head", {})) != {"kernel", "bias"}:
            raise UserError(
                "DELTA attention fits the model's `head` (a Dense on `pooled`); this model has "
                f"no head/kernel and head/bias (top-level parameters {sorted(params)[:6]})."
            )
        apply = jax.jit(lambda p, x: self.model.apply({"params": p, **state}, x))
        feats = jnp.concatenate([apply(params, b["image"])["pooled"] for b in batches])
        labels = jnp.concatenate([jnp.asarray(b["label"]) for b in batches])
        fitted = _fit_head(params["head"], feats, labels, int(o["head_steps"]))
        params = {**params, "head": fitted}
        self.attention_head = jax.tree.map(np.asarray, fitted)

        def batch_loss(p, x, y):
            logits = self.model.apply({"params": p, **state}, x)["logits"]
            return softmax_xent(logits, y)

        attention = {}
        for layer in self.layers:
            increase = jax.jit(
                lambda p, x, y, layer=layer: delta.channel_loss_increase(
                    functools.partial(batch_loss, x=x, y=y), p, f"{layer}/kernel"
                )
            )
            mean = np.mean(
                [np.asarray(increase(params, b["image"], b["label"])) for b in batches], 0
            )
            attention[layer] = np.asarray(delta.channel_attention(mean, float(o["temperature"])))
        return attention


def _fit_head(head: Mapping[str, Any], feats: jax.Array, labels: jax.Array, steps: int) -> dict:
    """A Dense head fitted to `feats` by `steps` full-batch Adam steps on cross-entropy."""
    tx = optax.adam(1e-2)

    def loss(h):
        return softmax_xent(feats @ h["kernel"] + h["bias"], labels)

    @jax.jit
    def run(h):
        def step(carry, _):
            h, s = carry
            g = jax.grad(loss)(h)
            u, s = tx.update(g, s, h)
            return (optax.apply_updates(h, u), s), None

        (h, _), _ = jax.lax.scan(step, (h, tx.init(h)), None, length=steps)
        return h

    return run(dict(head))
