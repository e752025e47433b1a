"""LiT on COCO captions: a locked, pretrained ViT-B/16 and a BERT-base text tower trained from
its pretrained weights, with CLIP's contrastive loss (Zhai et al. 2022, "LiT: Zero-Shot
Transfer with Locked-image text Tuning").

    xmodal train --config experiments/lit_coco.py:image_ckpt=PATH,text_ckpt=PATH \
        --workdir /shared/workdirs/lit_coco

The workdir is a directory every host mounts, or a `gs://` path.
Data: TFDS `coco_captions` (Karpathy splits) prepared as ArrayRecord once, with the `tf` extra:
`tfds build coco_captions --file_format=array_record --data_dir=$TFDS_DATA_DIR`. Weights:
`image_ckpt` a ViT-B/16 checkpoint `pretrained.load` reads (big_vision/AugReg `.npz`, timm
safetensors, or a converted file); `text_ckpt` a BERT-base-uncased directory (HF safetensors +
vocab.txt). Both default to random initialisation (smoke tests only).

The locked image tower's features are computed once per split and cached (`$XMODAL_CACHE`);
training then runs BERT-base and the projections only.

Pod settings (TPU v4-32, 16 chips, or 16 GPUs): `mesh = {'data': -1, 'fsdp': 8, 'model': 1}`.
The global batch of 4096 splits over data x fsdp (2 x 8); every parameter and Adam moment of at
least 2**16 elements is sharded over `fsdp` along its largest divisible dimension (FSDP), the
rest replicated; with `model` > 1 attention heads and MLP units split over it (tensor
parallelism). `model.loss.sharded=True` computes CLIP's loss with `shard_map`: each device
scores its rows against the gathered columns and never holds the full 4096 x 4096 logits.
Launch one process per host (`jax.distributed.initialize()` runs in `xmodal`); see `launch/`.
"""

import ml_collections

from xmodal_jax.config import parse_arg

# BERT-base-uncased and MiniLM share the uncased WordPiece vocabulary.
TEXT_PP = "random_caption('captions/text')|tokenize('minilm', 64)"


def coco_config(arg, *, loss: str, lock_image: bool) -> ml_collections.ConfigDict:
    """Shared COCO settings; `arg` takes the arguments below."""
    args = parse_arg(
        arg,
        image="vit_b16",
        text="bert_base",
        image_ckpt="",
        text_ckpt="",
        batch_size=4096,
        steps=20_000,
        image_size=224,
        fsdp=8,
    )
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "two_tower"
    c.total_steps = args.steps
    c.batch_size = args.batch_size
    c.lr = 1e-3
    c.optimizer = {"name": "adamw", "b2": 0.95, "weight_decay": 1e-4}
    c.lr_schedule = {"name": "cosine", "warmup_steps": min(1000, args.steps // 10)}
    c.grad_clip_norm = 1.0
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.mesh = {"data": -1, "fsdp": args.fsdp, "model": 1}
    c.model = {
        "image": {
            "tower": args.image,
            "pretrained": args.image_ckpt or None,
            "locked": lock_image,
            "batch_size": 256,
        },
        "text": {
            "tower": args.text,
            "pretrained": args.text_ckpt or None,
            "locked": False,
            "max_len": 64,
        },
        "embed_dim": 768,
        "image_proj": {"kind": "linear"},
        "text_proj": {"kind": "linear"},
        "loss": {"name": loss, "sharded": True},
    }
    c.data = {
        "name": "coco_captions",
        "split": "train",
        "pp": f"resize({args.image_size})|value_range(-1, 1)",
        "text": "captions",
        "text_pp": TEXT_PP,
    }
    c.evals = {
        "retrieval": {"type": "retrieval", "split": "test", "text_key": "captions/text"},
    }
    c.eval_batch_size = 512
    return c


def get_config(arg=None):
    return coco_config(arg, loss="clip", lock_image=True)
