"""SigLIP on COCO captions: ViT-B/16 and BERT-base both trained with the pairwise sigmoid loss
(t' = log 10, b = -10 at init; Zhai et al. 2023).

    xmodal train --config experiments/siglip_coco.py:image_ckpt=PATH,text_ckpt=PATH \
        --workdir /shared/workdirs/siglip_coco

Data, weights and pod settings as `experiments/lit_coco.py` (mesh data x fsdp = 2 x 8 on 16
chips, FSDP over `fsdp`). The sharded SigLIP loss passes text-embedding chunks round the
devices with `ppermute`, so no device builds the full logit matrix.
"""

from experiments.lit_coco import coco_config


def get_config(arg=None):
    return coco_config(arg, loss="siglip", lock_image=False)
