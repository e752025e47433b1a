"""BNM: Batch Nuclear-norm Maximisation on target predictions.

Cui et al., "Towards Discriminability and Diversity: Batch Nuclear-norm Maximization under
Label Insufficient Situations", CVPR 2020. With the target probabilities ``A = softmax(logits)``
([B, C]), the loss is the paper's ``L_bnm = -||A||_* / B``, the nuclear norm (sum of singular
values) divided by the batch size. Maximising ``||A||_*`` makes predictions confident (for a
fixed Frobenius norm it is largest when rows are one-hot: discriminability) and spread over many
classes (it bounds the rank of ``A``: diversity), where plain entropy minimisation may collapse
onto few classes.

Normalisation: the authors' code (github.com/cuishuhao/BNM, ``DA/BNM/train_image.py``) takes the
mean of the singular values that ``torch.svd`` returns, i.e. divides by ``min(B, C)``; that is
the paper's ``B`` whenever ``B <= C`` (their Office-Home runs: B = 36, C = 65). Here the
divisor is always ``B``; to match the code's scale when ``B > C``, multiply ``weight`` by
``B / C`` (e.g. 6.4 for digits, B = 64, C = 10).

The gradient of ``||A||_*`` is ``U V^T`` (thin SVD ``A = U S V^T``), defined where the singular
values are distinct and non-zero, which holds almost surely for softmax outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from xmodal_jax.objectives._util import require, resolve_config
from xmodal_jax.objectives.adaptation.api import AdaptationInputs

Array = jax.Array

DEFAULTS = {"weight": 1.0}


def bnm(logits: Array) -> Array:
    """Batch nuclear-norm loss ``-||softmax(logits)||_* / B`` of [B, C] target ``logits``."""
    if logits.ndim != 2:
        raise ValueError(f"BNM needs [B, C] logits, got shape {logits.shape}.")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    singular_values = jnp.linalg.svd(probs, compute_uv=False)
    return -jnp.sum(singular_values) / logits.shape[0]


def loss(inputs: AdaptationInputs, config: Mapping[str, Any] | None = None):
    """BNM on the target logits (``logits_t``) for the train step."""
    cfg = resolve_config(config, DEFAULTS, "bnm")
    require("bnm", logits_t=inputs.logits_t)
    value = bnm(inputs.logits_t)
    return cfg["weight"] * value, {"loss": value}
