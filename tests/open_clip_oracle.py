"""The open_clip oracle of tests/test_open_clip.py, run in a subprocess: `python
open_clip_oracle.py OUT`. It builds tiny random open_clip models, saves them as users download
them (hub folders with open_clip_config.json, a bare state dict) and writes open_clip's own
outputs on fixed inputs (features, logits, token ids) to OUT/*.npz and OUT/oracle.json.

It runs apart from the test process because open_clip imports torchvision, which has no build
for the CPU torch 2.13.0 installed beside it here: when `import torchvision` fails, stand-ins
for the names open_clip imports (transforms, FrozenBatchNorm2d) are put in sys.modules first.
None of them is used by what runs here (model construction, forward passes, the tokenizer);
they would fail if called. Kept out of the test process, they cannot reach transformers'
check for torchvision there.
"""

import importlib.machinery
import json
import os
import sys
import types

import numpy as np


def _stub_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401

        return False
    except Exception:
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]

    class Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision is not installed; this is a stand-in")

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
             "torchvision.ops", "torchvision.ops.misc")  # fmt: skip
    mods = {n: types.ModuleType(n) for n in names}
    for name, mod in mods.items():  # found by importlib.util.find_spec, as transformers asks
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    transforms = mods["torchvision.transforms"]
    for name in ("Normalize", "Compose", "RandomResizedCrop", "ToTensor", "Resize",
                 "CenterCrop", "ColorJitter", "Grayscale"):  # fmt: skip
        setattr(transforms, name, type(name, (Unavailable,), {}))
    transforms.InterpolationMode = types.SimpleNamespace(
        BICUBIC="bicubic", BILINEAR="bilinear", NEAREST="nearest"
    )
    transforms.functional = mods["torchvision.transforms.functional"]
    mods["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (Unavailable,), {})
    mods["torchvision"].transforms = transforms
    mods["torchvision"].ops = mods["torchvision.ops"]
    mods["torchvision.ops"].misc = mods["torchvision.ops.misc"]
    sys.modules.update(mods)
    return True


STUBBED = _stub_torchvision()
import open_clip  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch_testing import randomize  # noqa: E402

TEXTS = [
    "a photo of a cat",
    "  A   Dog\tRUNS through the   park.  ",
    "",
    "what's up?! 1234 (unbelievable)",
    "Héllo wörld — naïve café",
    "the quick brown fox jumps over the lazy dog " * 12,  # longer than 77 tokens
]

SMALL_TEXT = dict(context_length=16, vocab_size=100, width=48, heads=4, layers=2)
CASES = {
    # ViT, cls token pooling, quick-GELU, real BPE vocabulary; hub folder with both weight files.
    "vit_cls": dict(
        model_cfg=dict(
            embed_dim=32,
            quick_gelu=True,
            vision_cfg=dict(layers=2, width=64, head_width=16, patch_size=8, image_size=32),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2),
        ),
        preprocess_cfg=dict(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]),
        files=("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    ),
    # ViT pooled by the patch tokens' mean, LayerNorm after pooling, no pre-norm, GELU, eps 1e-6.
    "vit_avg": dict(
        model_cfg=dict(
            embed_dim=24,
            vision_cfg=dict(
                layers=2,
                width=64,
                head_width=32,
                patch_size=8,
                image_size=32,
                pool_type="avg",
                final_ln_after_pool=True,
                no_ln_pre=True,
                norm_kwargs=dict(eps=1e-6),
            ),  # fmt: skip
            text_cfg=dict(**SMALL_TEXT, norm_kwargs=dict(eps=1e-6)),
        ),
        preprocess_cfg={},
        files=("open_clip_pytorch_model.bin",),
    ),
    # ModifiedResNet (stem, anti-aliased downsampling, attention pool), GELU text; a bare file.
    "rn": dict(
        model_cfg=dict(
            embed_dim=40,
            vision_cfg=dict(layers=[1, 2, 1, 1], width=16, head_width=16, image_size=64),
            text_cfg=SMALL_TEXT,
        ),
        preprocess_cfg=None,
        files=("rn.bin",),
    ),
}


def _case(out: str, name: str, case: dict, seed: int) -> None:
    cfg = case["model_cfg"]
    model = open_clip.CLIP(**cfg)
    randomize(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(np.log(20.0))
    folder = os.path.join(out, name)
    os.makedirs(folder)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    for file in case["files"]:
        path = os.path.join(folder, file)
        save_file(sd, path) if file.endswith(".safetensors") else torch.save(sd, path)
    if case["preprocess_cfg"] is not None:
        with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": cfg, "preprocess_cfg": case["preprocess_cfg"]}, f)

    rng = np.random.RandomState(seed)
    size = cfg["vision_cfg"]["image_size"]
    images = rng.randn(3, 3, size, size).astype(np.float32)  # already preprocessed, NCHW
    tc = cfg["text_cfg"]
    if tc["vocab_size"] == 49408:
        ids = open_clip.tokenize(TEXTS, context_length=tc["context_length"]).numpy()
    else:  # the end-of-text token is the highest id of each row, then padding
        ids = rng.randint(1, tc["vocab_size"] - 1, (4, tc["context_length"]))
        for row, end in enumerate((15, 3, 9, 6)):
            ids[row, end] = tc["vocab_size"] - 1
            ids[row, end + 1 :] = 0
    with torch.no_grad():
        zi = model.encode_image(torch.from_numpy(images))
        zt = model.encode_text(torch.from_numpy(ids))
        logits, _ = model.get_logits(torch.from_numpy(images), torch.from_numpy(ids))
        result = dict(images=images, ids=ids, image_features=zi.numpy(),
                      text_features=zt.numpy(), logits=logits.numpy())  # fmt: skip
        # uint8 images at the model's size: open_clip's transform is then ToTensor + Normalize
        pre = case["preprocess_cfg"] or {}
        mean = np.asarray(pre.get("mean", open_clip.OPENAI_DATASET_MEAN), np.float32)
        std = np.asarray(pre.get("std", open_clip.OPENAI_DATASET_STD), np.float32)
        uint8 = rng.randint(0, 256, (2, size, size, 3)).astype(np.uint8)
        pixels = torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 255
        pixels = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        result["uint8_images"] = uint8
        result["uint8_logits"] = model.get_logits(pixels, torch.from_numpy(ids))[0].numpy()
    np.savez(os.path.join(out, f"{name}.npz"), **result)


def main(out: str) -> None:
    torch.manual_seed(0)
    for seed, (name, case) in enumerate(CASES.items()):
        _case(out, name, case, seed)
    tok = open_clip.get_tokenizer("ViT-B-32")
    record = {
        "torchvision_stubbed": STUBBED,
        "texts": TEXTS,
        "token_ids": tok(TEXTS).tolist(),
        "model_configs": {n: open_clip.get_model_config(n) for n in open_clip.list_models()},
    }
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1])
