"""The timm oracle of tests/test_timm_oracle.py (and benchmarks/parity.py), run in a subprocess:
`python timm_oracle.py OUT`. It builds small random timm ViTs, saves them as users get them
(hub folders written by timm's own `save_for_hf`: `config.json` + `model.safetensors`; a bare
`torch.save` state dict) and writes timm's outputs on fixed inputs (pooled features, logits) to
OUT/<case>.npz, and OUT/oracle.json (the cases, timm's version).

A subprocess because timm imports torchvision, which has no build for the CPU torch 2.13.0
installed beside it here: `torchvision_standin` answers those imports when the real one fails
(none of its stand-ins is used by model construction or forward passes).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torchvision_standin
from torch_testing import randomize

STUBBED = torchvision_standin.install()
import timm  # noqa: E402
import torch  # noqa: E402
from timm.models import save_for_hf  # noqa: E402

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=5)
CASES = {
    # timm's "tiny" size (width 192, 3 heads); config.json names the model, heads from its size.
    "tiny_hub": dict(name="vit_tiny_patch16_224", args=dict(SMALL), save="hub"),
    # width 96 with 4 heads of 24: config.json's model_args give them (embed_dim, num_heads).
    "narrow_hub": dict(
        name="vit_small_patch16_224", args=dict(SMALL, embed_dim=96, num_heads=4), save="hub"
    ),
    # pooled by the patch tokens' mean with fc_norm after pooling, 3 heads of 16.
    "avg_hub": dict(
        name="vit_base_patch16_224",
        args=dict(SMALL, embed_dim=48, num_heads=3, global_pool="avg"),
        save="hub",
    ),
    # a bare state dict (no config.json), width 96 with 12 heads of 8: `--arch vit_b16`.
    "bare_pth": dict(
        name="vit_base_patch16_224", args=dict(SMALL, embed_dim=96, num_heads=12), save="pth"
    ),
}


def _case(out: str, name: str, case: dict, seed: int) -> dict:
    model = randomize(timm.create_model(case["name"], pretrained=False, **case["args"]), seed)
    folder = os.path.join(out, name)
    if case["save"] == "hub":
        save_for_hf(model, folder, safe_serialization=True)
        src = folder
    else:
        os.makedirs(folder)
        src = os.path.join(folder, f"{name}.pth")
        torch.save(model.state_dict(), src)
    images = np.random.RandomState(seed).randn(3, 3, 32, 32).astype(np.float32)  # NCHW
    with torch.no_grad():
        x = torch.from_numpy(images)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    np.savez(
        os.path.join(out, f"{name}.npz"),
        images=images.transpose(0, 2, 3, 1),  # NHWC, as our towers take them
        pooled=pooled.numpy(),
        logits=logits.numpy(),
    )
    heads = model.blocks[0].attn.num_heads
    return dict(src=os.path.relpath(src, out), heads=heads, width=model.embed_dim, **case)


def main(out: str) -> None:
    torch.manual_seed(0)
    cases = {name: _case(out, name, case, seed) for seed, (name, case) in enumerate(CASES.items())}
    record = {"timm": timm.__version__, "torchvision_stubbed": STUBBED, "cases": cases}
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
