"""torchvision ResNet and MobileNetV2 state dicts -> our towers.

Key names as saved by torchvision (`torchvision/models/resnet.py`, `mobilenetv2.py`):
- ResNet: `conv1`, `bn1`, `layer{1..4}.{j}.conv{1,2,3}` / `bn{1,2,3}`, `layer{i}.0.downsample.{0,1}`
  (1x1 conv + BN), `fc`.
- MobileNetV2: `features.0.{0,1}` (stem conv + BN), `features.{1..17}.conv.*` (inverted residual:
  `[expand conv, BN], [depthwise conv, BN], project conv, BN`, the expansion pair absent when
  t = 1), `features.18.{0,1}` (last 1x1 conv + BN), `classifier.1` (Linear after Dropout).
"""

from __future__ import annotations

from xmodal_jax.models import mobilenet_v2, resnet
from xmodal_jax.transfer import torch_layout as tl
from xmodal_jax.transfer.converted import Converted, closest_arch

IMAGENET = {"image_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _conv_bn(sd: tl.StateDict, p: dict, s: dict, ours: str, conv_key: str, bn_key: str) -> None:
    tl.put(p, f"params/{ours}_conv", tl.conv(sd, conv_key))
    bn_p, bn_s = tl.batch_norm(sd, bn_key)
    tl.put(p, f"params/{ours}_norm", bn_p)
    tl.put(s, f"batch_stats/{ours}_norm", bn_s)


def is_resnet(keys: set[str]) -> bool:
    return "conv1.weight" in keys and "layer1.0.conv1.weight" in keys


def convert_resnet(sd: tl.StateDict) -> Converted:
    sizes = tuple(sd.count(f"layer{i}.{{}}.conv1.weight") for i in range(1, 5))
    block = "bottleneck" if sd.has("layer1.0.conv3.weight") else "basic"
    stem_w = sd.tensors["conv1.weight"]
    base = stem_w.shape[0]
    p, s = {}, {}
    _conv_bn(sd, p, s, "stem", "conv1", "bn1")
    n = 3 if block == "bottleneck" else 2
    for i, count in enumerate(sizes, 1):
        for j in range(count):
            ours = f"stage{i}_block{j + 1}"
            for k in range(1, n + 1):
                tl.put(p, f"params/{ours}_conv{k}", tl.conv(sd, f"layer{i}.{j}.conv{k}"))
                bn_p, bn_s = tl.batch_norm(sd, f"layer{i}.{j}.bn{k}")
                tl.put(p, f"params/{ours}_norm{k}", bn_p)
                tl.put(s, f"batch_stats/{ours}_norm{k}", bn_s)
            if sd.has(f"layer{i}.{j}.downsample.0.weight"):
                _conv_bn(
                    sd,
                    p,
                    s,
                    f"{ours}_proj",
                    f"layer{i}.{j}.downsample.0",
                    f"layer{i}.{j}.downsample.1",
                )
    overrides = dict(
        width=base / 64, stem="imagenet" if stem_w.shape[-1] == 7 else "small", num_classes=0
    )
    depth = next((d for d, (b, st) in resnet.STAGES.items() if (b, st) == (block, sizes)), None)
    if depth is None:
        overrides.update(stage_sizes=sizes, block=block, depth=50)
    else:
        overrides["depth"] = depth
    if sd.has("fc.weight"):
        tl.put(p, "params/head", tl.linear(sd, "fc"))
        overrides["num_classes"] = int(sd.tensors["fc.weight"].shape[0])
    sd.finish()
    arch = closest_arch("resnet", overrides, "resnet50")
    return Converted(arch, overrides, {**p, **s}, {"preprocess": IMAGENET})


def is_mobilenet_v2(keys: set[str]) -> bool:
    return "features.0.0.weight" in keys and "features.1.conv.0.0.weight" in keys


def _infer_width(sd: tl.StateDict) -> float:
    stem = sd.tensors["features.0.0.weight"].shape[0]
    last = sd.tensors["features.18.0.weight"].shape[0]
    for width in (1.0, 0.75, 0.5, 0.35, 1.3, 1.4, 0.25, 1.25, 1.5, 2.0):
        md = mobilenet_v2.make_divisible
        if md(32 * width) == stem and md(1280 * max(1.0, width)) == last:
            return width
    raise tl.ConversionError(
        f"{sd.source}: MobileNetV2 with stem width {stem} / last width {last} matches no usual "
        "width multiplier; pass arch and build the tower with width=... explicitly."
    )


def convert_mobilenet_v2(sd: tl.StateDict) -> Converted:
    p, s = {}, {}
    _conv_bn(sd, p, s, "stem", "features.0.0", "features.0.1")
    index = 0
    for t, _c, n, _s in mobilenet_v2.SETTINGS:
        for _ in range(n):
            index += 1
            src, ours = f"features.{index}.conv", f"block{index}"
            names = ["dw", "project"] if t == 1 else ["expand", "dw", "project"]
            for k, name in enumerate(names):
                if name == "project":
                    tl.put(p, f"params/{ours}_project_conv", tl.conv(sd, f"{src}.{k}"))
                    bn_p, bn_s = tl.batch_norm(sd, f"{src}.{k + 1}")
                    tl.put(p, f"params/{ours}_project_norm", bn_p)
                    tl.put(s, f"batch_stats/{ours}_project_norm", bn_s)
                elif name == "dw":
                    tl.put(p, f"params/{ours}_dw_conv", tl.conv(sd, f"{src}.{k}.0"))
                    bn_p, bn_s = tl.batch_norm(sd, f"{src}.{k}.1")
                    tl.put(p, f"params/{ours}_dw_norm", bn_p)
                    tl.put(s, f"batch_stats/{ours}_dw_norm", bn_s)
                else:
                    _conv_bn(sd, p, s, f"{ours}_expand", f"{src}.{k}.0", f"{src}.{k}.1")
    _conv_bn(sd, p, s, "last", f"features.{index + 1}.0", f"features.{index + 1}.1")
    overrides = dict(width=_infer_width(sd), num_classes=0)
    if sd.has("classifier.1.weight"):
        tl.put(p, "params/head", tl.linear(sd, "classifier.1"))
        overrides["num_classes"] = int(sd.tensors["classifier.1.weight"].shape[0])
    sd.finish()
    return Converted("mobilenet_v2", overrides, {**p, **s}, {"preprocess": IMAGENET})
