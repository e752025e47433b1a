"""Checkpoint surgery: re-initialised heads, skipped entries, position-embedding resizing
(against a float64 numpy bilinear reference), scan/unscanned layouts, and one error that
lists every unexplained mismatch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_testing import jit_apply

from xmodal_jax.models import zoo
from xmodal_jax.transfer import checkpoint_io, surgery

VIT = dict(width=16, depth=2, num_heads=2, mlp_dim=24, patch_size=8, image_size=32)


def _boxed(model, x):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def _random(model, x, seed):
    """Concrete random variables of `model`, logical-axis boxes kept (drawn and cast in numpy,
    then `device_put`: `jnp.asarray` would compile a conversion program per shape)."""
    rng = np.random.RandomState(seed)
    fill = lambda a: jax.device_put(np.asarray(rng.randn(*a.shape), a.dtype))
    return jax.tree.map(fill, _boxed(model, x))


def _vit(seed=0, image=32, **overrides):
    model = zoo.build("vit_s16", **{**VIT, "image_size": image, **overrides})
    x = jnp.zeros((1, image, image, 3))
    return model, _random(model, x, seed)


def _flat(variables):
    return {k: np.asarray(v) for k, v in checkpoint_io.flatten(variables).items()}


def test_reinit_head_keeps_fresh_init_and_loads_the_rest():
    _, source = _vit(0, num_classes=5)
    model, target = _vit(1, num_classes=10)
    with pytest.raises(surgery.CheckpointMismatchError, match="params/head/kernel") as err:
        surgery.merge(target, source)
    assert "params/head/bias" in str(err.value) and "reinit=" in str(err.value)
    merged = surgery.merge(target, source, reinit=[r"^params/head/"])
    m, s, t = _flat(merged), _flat(source), _flat(target)
    for path in m:
        np.testing.assert_array_equal(m[path], t[path] if "/head/" in path else s[path])
    out = jit_apply(model, nn.unbox(merged), jnp.zeros((1, 32, 32, 3)))
    assert out["logits"].shape == (1, 10)


def test_error_lists_every_missing_unexpected_and_misshaped_entry():
    _, source = _vit(0, num_classes=5)
    _, target = _vit(1, num_classes=10)
    flat = _flat(source)
    del flat["params/norm/scale"]
    flat["params/pooler/kernel"] = np.zeros((16, 16), np.float32)
    with pytest.raises(surgery.CheckpointMismatchError) as err:
        surgery.merge(target, checkpoint_io.unflatten(flat), source="demo.safetensors")
    msg = str(err.value)
    assert "1 missing" in msg and "params/norm/scale" in msg
    assert "1 unexpected" in msg and "params/pooler/kernel" in msg
    assert "2 mis-shaped" in msg and "params/head/kernel: demo.safetensors (16, 5)" in msg
    # each problem explained by an option: then it loads
    flat["params/norm/scale"] = _flat(target)["params/norm/scale"]
    merged = surgery.merge(
        target, checkpoint_io.unflatten(flat), reinit=["head"], skip=[r"^params/pooler/"]
    )
    assert set(_flat(merged)) == set(_flat(target))


def _np_bilinear(grid, out_h, out_w):
    """Half-pixel-centre bilinear resize of [h, w, d] in float64 (edge samples clamped)."""

    def taps(n_in, n_out):
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), pos - lo

    y0, y1, fy = taps(grid.shape[0], out_h)
    x0, x1, fx = taps(grid.shape[1], out_w)
    fx = fx[None, :, None]
    rows = lambda y: grid[y][:, x0] * (1 - fx) + grid[y][:, x1] * fx
    return rows(y0) * (1 - fy)[:, None, None] + rows(y1) * fy[:, None, None]


@pytest.mark.parametrize("pool", ["cls", "gap"])
@pytest.mark.parametrize("src_image,dst_image", [(32, 48), (48, 32)])
def test_posemb_resize_matches_numpy_bilinear(pool, src_image, dst_image):
    _, source = _vit(0, image=src_image, pool=pool)
    model, target = _vit(1, image=dst_image, pool=pool)
    merged = surgery.merge(target, source)
    src = np.asarray(nn.unbox(source)["params"]["pos_embedding"], np.float64)[0]
    got = np.asarray(nn.unbox(merged)["params"]["pos_embedding"])[0]
    prefix = 1 if pool == "cls" else 0
    gs, gt = src_image // 8, dst_image // 8
    ref = _np_bilinear(src[prefix:].reshape(gs, gs, -1), gt, gt).reshape(gt * gt, -1)
    assert got.shape == (prefix + gt * gt, 16)
    np.testing.assert_allclose(got[prefix:], ref, atol=1e-5)
    np.testing.assert_array_equal(got[:prefix], src[:prefix].astype(np.float32))
    out = jit_apply(model, nn.unbox(merged), jnp.zeros((1, dst_image, dst_image, 3)))
    assert np.isfinite(np.asarray(out["pooled"])).all()


def test_posemb_with_cls_does_not_resize_into_model_without_cls():
    _, source = _vit(0, pool="cls")
    _, target = _vit(1, pool="gap", image=48)
    with pytest.raises(surgery.CheckpointMismatchError, match="pos_embedding") as err:
        surgery.merge(target, source)
    assert "params/cls" in str(err.value)  # the unused cls token is reported too


def test_scanned_and_unscanned_layouts_load_into_each_other():
    _, plain = _vit(0)
    scanned_model, scanned = _vit(1, scan_layers=True)
    merged = surgery.merge(scanned, plain)
    stacked = surgery.stack_layers(_flat(plain))
    for path, value in _flat(merged).items():
        np.testing.assert_array_equal(value, stacked[path])
    assert _flat(merged)["params/encoder/layers/mlp/fc1/kernel"].shape == (2, 16, 24)
    back = surgery.merge(plain, merged)
    for path, value in _flat(back).items():
        np.testing.assert_array_equal(value, _flat(plain)[path])
    x = jnp.asarray(np.random.RandomState(0).randn(1, 32, 32, 3), jnp.float32)
    plain_model = zoo.build("vit_s16", **VIT)
    a = jit_apply(plain_model, nn.unbox(plain), x)["pooled"]
    b = jit_apply(scanned_model, nn.unbox(merged), x)["pooled"]
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_merge_keeps_logical_boxes_and_casts_dtype():
    _, source = _vit(0)
    _, target = _vit(1)
    half = jax.tree.map(lambda a: np.asarray(a, np.float16), nn.unbox(source))
    merged = surgery.merge(target, half)
    kernel = merged["params"]["encoder"]["layer_0"]["attn"]["query"]["kernel"]
    assert isinstance(kernel, nn.LogicallyPartitioned)
    assert kernel.names == ("embed", "heads", "kv")
    assert kernel.value.dtype == jnp.float32


def test_init_from_converted_checkpoint_file(tmp_path):
    _, source = _vit(0, num_classes=3)
    path = str(tmp_path / "ckpt.safetensors")
    checkpoint_io.save(path, source, {"arch": "vit_s16", "overrides": VIT})
    _, target = _vit(1, num_classes=7)
    merged = surgery.init_from(target, path, reinit=["head"])
    np.testing.assert_array_equal(
        _flat(merged)["params/norm/scale"], _flat(source)["params/norm/scale"]
    )
    variables, meta = checkpoint_io.load(path)
    assert meta["arch"] == "vit_s16" and meta["format"] == checkpoint_io.FORMAT
    with pytest.raises(ValueError, match="not a converted"):
        checkpoint_io.load(str(tmp_path / "missing.safetensors"))
