"""Image-text matching (ITM) with in-batch hard negatives.

A fused head scores whether an image and a text belong together. Each batch of B matched pairs
gives 3B examples: the B positives; for every image the hardest non-matching text; and for
every text the hardest non-matching image, "hardest" meaning most similar under a given
similarity matrix (e.g. the contrastive logits). Negatives are the argmax (`sampling='hardest'`)
or drawn with probability softmax(similarity / temperature) over the non-matching entries
(`sampling='softmax'`, as in ALBEF, Li et al. 2021). The loss is binary cross-entropy on a
linear match score over the head's `fused` output.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

SAMPLING = ("hardest", "softmax")


def hard_negatives(
    similarity: jax.Array,
    *,
    sampling: str = "hardest",
    rng: jax.Array | None = None,
    temperature: float = 1.0,
    positive_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Picks one negative per row and per column of similarity[image, text] ([B, B]).

    Returns (text index for each image [B], image index for each text [B]). The diagonal and
    the entries where `positive_mask` is True (e.g. other captions of the same image) are
    never picked.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square [B, B]; got {similarity.shape}.")
    b = similarity.shape[0]
    if b < 2:
        raise ValueError("ITM needs a batch of at least 2 pairs to find in-batch negatives.")
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}; got {sampling!r}.")
    if sampling == "softmax" and rng is None:
        raise ValueError("sampling='softmax' draws negatives at random; pass rng.")
    excluded = jnp.eye(b, dtype=bool)
    if positive_mask is not None:
        excluded = excluded | positive_mask.astype(bool)
    sim = jnp.where(excluded, -jnp.inf, jax.lax.stop_gradient(similarity).astype(jnp.float32))
    if sampling == "hardest":
        return jnp.argmax(sim, axis=1), jnp.argmax(sim, axis=0)
    rng_t, rng_i = jax.random.split(rng)
    text_for_image = jax.random.categorical(rng_t, sim / temperature, axis=1)
    image_for_text = jax.random.categorical(rng_i, sim / temperature, axis=0)
    return text_for_image, image_for_text


def itm_pairs(
    image_feats: jax.Array,
    text_feats: jax.Array,
    text_for_image: jax.Array,
    image_for_text: jax.Array,
    *,
    image_tokens: jax.Array | None = None,
    text_tokens: jax.Array | None = None,
    text_mask: jax.Array | None = None,
) -> tuple[dict[str, jax.Array | None], jax.Array]:
    """Stacks [positives; image + negative text; negative image + text] and their 0/1 labels."""
    b = image_feats.shape[0]
    arange = jnp.arange(b)
    img_idx = jnp.concatenate([arange, arange, image_for_text])
    txt_idx = jnp.concatenate([arange, text_for_image, arange])
    take = lambda x, idx: None if x is None else jnp.take(x, idx, axis=0)
    inputs = {
        "image_feats": take(image_feats, img_idx),
        "text_feats": take(text_feats, txt_idx),
        "image_tokens": take(image_tokens, img_idx),
        "text_tokens": take(text_tokens, txt_idx),
        "text_mask": take(text_mask, txt_idx),
    }
    labels = jnp.concatenate([jnp.ones(b), jnp.zeros(2 * b)])
    return inputs, labels


def itm_loss(
    score_fn: Callable[..., jax.Array],
    image_feats: jax.Array,
    text_feats: jax.Array,
    similarity: jax.Array,
    *,
    sampling: str = "hardest",
    rng: jax.Array | None = None,
    temperature: float = 1.0,
    positive_mask: jax.Array | None = None,
    image_tokens: jax.Array | None = None,
    text_tokens: jax.Array | None = None,
    text_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean binary cross-entropy of the match score over positives and hard negatives.

    `score_fn(image_feats, text_feats, *, image_tokens, text_tokens, text_mask)` returns match
    logits [M], e.g. `lambda *a, **k: ITMHead(...).apply(variables, *a, **k)["score"]`.
    Returns (loss, {'loss', 'accuracy'}), accuracy of `score > 0` over the 3B examples.
    """
    text_for_image, image_for_text = hard_negatives(
        similarity,
        sampling=sampling,
        rng=rng,
        temperature=temperature,
        positive_mask=positive_mask,
    )
    inputs, labels = itm_pairs(
        image_feats,
        text_feats,
        text_for_image,
        image_for_text,
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        text_mask=text_mask,
    )
    feats = (inputs.pop("image_feats"), inputs.pop("text_feats"))
    logits = score_fn(*feats, **inputs).astype(jnp.float32)
    if logits.shape != labels.shape:
        raise ValueError(
            f"score_fn must return one match logit per pair, shape {labels.shape}; got "
            f"{logits.shape}. Return the head's 'score', not 'fused'."
        )
    loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
    accuracy = jnp.mean((logits > 0) == (labels > 0.5))
    return loss, {"loss": loss, "accuracy": accuracy}
