"""CLIP on COCO captions: ViT-B/16 and BERT-base both trained (from pretrained weights or from
scratch) with the symmetric softmax loss, learnable temperature (init 1/0.07, clamped at 100).

    xmodal train --config experiments/clip_coco.py:image_ckpt=PATH,text_ckpt=PATH \
        --workdir /shared/workdirs/clip_coco

Data, weights and pod settings as `experiments/lit_coco.py` (mesh data x fsdp = 2 x 8 on 16
chips, FSDP over `fsdp`, the loss's local-loss `shard_map` over the batch axes); the image
tower is trained here, so nothing is cached and both towers run forward and backward.
"""

from experiments.lit_coco import coco_config


def get_config(arg=None):
    return coco_config(arg, loss="clip", lock_image=False)
