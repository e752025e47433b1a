"""PyTorch references for `xmodal bench --torch`: the same architectures, batches, precision
and optimisers as `workloads`, run eagerly and through `torch.compile`.

Imported only when `--torch` is given; torch is a test/oracle extra, never a runtime dependency.

OpenMP threads sleep between parallel regions (`OMP_WAIT_POLICY=PASSIVE`, unless set already):
with the default spinning, PyTorch's threads and XLA's pool, alternating in one process on a
busy machine, slowed PyTorch's small CLIP step about 100-fold (9 ms -> 1 s). Set before torch
loads OpenMP.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from xmodal_jax.errors import UserError  # noqa: E402
from xmodal_jax.models.mobilenet_v2 import SETTINGS, make_divisible  # noqa: E402


def set_threads(n: int) -> None:
    """Use `n` intra-op threads, the number of cores JAX's CPU client uses."""
    torch.set_num_threads(n)


def cores() -> int:
    return len(os.sched_getaffinity(0))


def device_for(backend: str) -> torch.device:
    """The device the references run on: the kind JAX runs on (`jax.default_backend()`), so
    that both sides of a ratio use the same chip."""
    if backend == "cpu":
        return torch.device("cpu")
    if backend in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
        return torch.device("cuda")
    raise UserError(
        f"--torch: JAX runs on {backend!r} but this PyTorch cannot (torch "
        f"{torch.__version__}, CUDA available: {torch.cuda.is_available()}); a comparison with "
        "PyTorch on the host CPU would mean nothing. Install a PyTorch for this accelerator, or "
        "drop --torch."
    )


# ---------------------------------------------------------------- CLIP two-tower


def _encoder(width: int, depth: int, heads: int, act: Any, eps: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        width, heads, 4 * width, dropout=0.0, activation=act, layer_norm_eps=eps,
        batch_first=True, norm_first=True,
    )  # fmt: skip
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class ViT(nn.Module):
    """Pre-LN ViT with cls pooling, CLIP's pre-norm and bias-free projection."""

    def __init__(self, sz: dict):
        super().__init__()
        d, p = sz["width"], sz["patch"]
        self.embed = nn.Conv2d(3, d, p, stride=p)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 1 + (sz["image"] // p) ** 2, d) * 0.02)
        self.norm_pre = nn.LayerNorm(d, eps=1e-6)
        self.encoder = _encoder(d, sz["depth"], sz["heads"], "gelu", 1e-6)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.proj = nn.Linear(d, sz["proj"], bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = self.norm(self.encoder(self.norm_pre(x)))
        return self.proj(x[:, 0])


class CLIPText(nn.Module):
    """Causal pre-LN text transformer with quick-GELU, pooled at the highest token id."""

    def __init__(self, sz: dict):
        super().__init__()
        d = sz["text_width"]
        self.tok = nn.Embedding(sz["vocab"], d)
        self.pos = nn.Parameter(torch.randn(sz["context"], d) * 0.01)
        self.encoder = _encoder(d, sz["text_depth"], sz["text_heads"], _quick_gelu, 1e-5)
        self.norm = nn.LayerNorm(d, eps=1e-5)
        self.proj = nn.Linear(d, sz["proj"], bias=False)
        n = sz["context"]
        self.register_buffer("mask", torch.triu(torch.full((n, n), float("-inf")), 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        # The hint spares the encoder checking the mask's values each call, a data-dependent
        # branch that splits torch.compile's graph.
        x = self.norm(self.encoder(x, mask=self.mask, is_causal=True))
        return self.proj(x[torch.arange(ids.shape[0], device=ids.device), ids.argmax(-1)])


class ClipLoss(nn.Module):
    def __init__(self, sz: dict):
        super().__init__()
        self.image, self.text = ViT(sz), CLIPText(sz)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, batch: dict) -> torch.Tensor:
        zi = F.normalize(self.image(batch["image"]), dim=-1)
        zt = F.normalize(self.text(batch["text"]), dim=-1)
        logits = self.log_scale.exp() * zi @ zt.T
        target = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# ---------------------------------------------------------------- ResNet-50


def _bn_conv(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out, momentum=0.1, eps=1e-5))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride in the 3x3 conv."""

    def __init__(self, c_in: int, mid: int, stride: int):
        super().__init__()
        out = 4 * mid
        self.body = nn.Sequential(
            _bn_conv(c_in, mid, 1), nn.ReLU(), _bn_conv(mid, mid, 3, stride), nn.ReLU(),
            _bn_conv(mid, out, 1),
        )  # fmt: skip
        self.proj = _bn_conv(c_in, out, 1, stride) if stride != 1 or c_in != out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + (x if self.proj is None else self.proj(x)))


class ResNetLoss(nn.Module):
    def __init__(self, sz: dict):
        super().__init__()
        base = max(1, round(64 * sz["width"]))
        blocks: list[nn.Module] = [_bn_conv(3, base, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        c = base
        for i, n in enumerate(sz["stages"]):
            for j in range(n):
                blocks.append(Bottleneck(c, base * 2**i, 2 if (i > 0 and j == 0) else 1))
                c = 4 * base * 2**i
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(c, sz["classes"])

    def forward(self, batch: dict) -> torch.Tensor:
        logits = self.head(self.body(batch["image"]).mean((2, 3)))
        return F.cross_entropy(logits, batch["label"])


# ---------------------------------------------------------------- MobileNetV2 + DANN


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, t: int):
        super().__init__()
        hidden = int(round(c_in * t))
        layers: list[nn.Module] = []
        if t != 1:
            layers += [_bn_conv(c_in, hidden, 1), nn.ReLU6()]
        layers += [_bn_conv(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += [_bn_conv(hidden, c_out, 1)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def mobilenet_v2(width: float) -> tuple[nn.Sequential, int]:
    """The torchvision MobileNetV2 feature extractor (pooled) and its output width."""
    c = make_divisible(32 * width)
    layers: list[nn.Module] = [_bn_conv(3, c, 3, 2), nn.ReLU6()]
    for t, ch, n, s in SETTINGS:
        c_out = make_divisible(ch * width)
        for i in range(n):
            layers.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
            c = c_out
    last = make_divisible(1280 * max(1.0, width))
    layers += [_bn_conv(c, last, 1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), last


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coeff * grad, None


def _discriminator(width: int, hidden: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 1))


class DannLoss(nn.Module):
    """Source cross-entropy + domain BCE of an MLP discriminator on gradient-reversed features."""

    def __init__(self, sz: dict):
        super().__init__()
        self.features, width = mobilenet_v2(sz["width"])
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(width, sz["classes"]))
        self.disc = _discriminator(width, sz["disc"])

    def forward(self, batch: dict) -> torch.Tensor:
        n = batch["label"].shape[0]
        f = self.features(torch.cat([batch["source"], batch["target"]]))
        ce = F.cross_entropy(self.head(f[:n]), batch["label"])
        d = self.disc(_Reverse.apply(f, 1.0))[:, 0]
        ones, zeros = torch.ones(n, device=d.device), torch.zeros(f.shape[0] - n, device=d.device)
        domain = torch.cat([ones, zeros])
        return ce + F.binary_cross_entropy_with_logits(d, domain)


class LeNetDannLoss(DannLoss):
    """`DannLoss` on `models.lenet.LeNet` (two 5x5 convolutions, a 500-unit layer, dropout, the
    bottleneck whose features the discriminator sees)."""

    def __init__(self, sz: dict):
        nn.Module.__init__(self)
        self.conv1 = nn.Conv2d(sz["channels"], 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc = nn.Linear(800, 500)
        self.bottleneck = nn.Linear(500, sz["bottleneck"])
        self.head = nn.Linear(sz["bottleneck"], sz["classes"])
        self.disc = _discriminator(sz["bottleneck"], sz["disc"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(F.dropout2d(self.conv2(x), 0.5, self.training), 2))
        x = F.dropout(F.relu(self.fc(x.flatten(1))), 0.5, self.training)
        return F.relu(self.bottleneck(x))


# ---------------------------------------------------------------- runners


def _batch(name: str, sz: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, s, c = sz["batch"], sz["image"], sz.get("channels", 3)
    img = lambda: torch.randn(b, c, s, s, generator=g)
    if name == "clip":
        ids = torch.randint(1, sz["vocab"] - 1, (b, sz["context"]), generator=g)
        ids[torch.arange(b), torch.randint(2, sz["context"], (b,), generator=g)] = sz["vocab"] - 1
        return {"image": img(), "text": ids}
    if name == "resnet50":
        return {"image": img(), "label": torch.randint(0, sz["classes"], (b,), generator=g)}
    labels = torch.randint(0, sz["classes"], (b,), generator=g)
    return {"source": img(), "target": img(), "label": labels}


class Runner:
    """One optimiser step per `step()` of the reference model, eager or `torch.compile`d, on
    `device`; on CUDA each step waits for the device, as ours does (`block_until_ready`)."""

    def __init__(
        self, name: str, sz: dict, compiled: bool, bf16: bool = False, device: str = "cpu"
    ):
        torch.manual_seed(0)
        self.device = torch.device(device)
        if self.device.type == "cuda":  # cuDNN picks its fastest convolutions, as users set
            torch.backends.cudnn.benchmark = True
        losses = {"clip": ClipLoss, "resnet50": ResNetLoss, "mnv2_dann": DannLoss,
                  "lenet_dann": LeNetDannLoss}  # fmt: skip
        # On CUDA the convolutions run channels-last, the layout NVIDIA's tensor-core kernels
        # want (and XLA picks for ours); on CPU, PyTorch's default layout.
        layout = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        model = losses[name](sz).to(self.device, memory_format=layout)
        self.model = model.train()
        if name == "clip":  # as `workloads._optimizer`
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        else:
            self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.forward = torch.compile(model) if compiled else model
        self.batch = {
            k: v.to(self.device, memory_format=layout) if v.dim() == 4 else v.to(self.device)
            for k, v in _batch(name, sz).items()
        }
        self.bf16 = bf16
        start = time.perf_counter()
        self.step()  # torch.compile compiles on the first call
        self.compile_s = time.perf_counter() - start

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.forward(self.batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def mobilenet_forward(width: float, batch: int, image: int) -> Any:
    """A `() -> None` inference forward of the ImageNet MobileNetV2 (1000 classes), eager."""
    features, c = mobilenet_v2(width)
    model = nn.Sequential(features, nn.Linear(c, 1000)).eval()
    x = torch.randn(batch, 3, image, image)

    def call() -> None:
        with torch.inference_mode():
            model(x)

    return call
