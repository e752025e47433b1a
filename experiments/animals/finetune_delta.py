"""Full fine-tuning with DELTA (Li et al., ICLR 2019): feature maps kept close to the pretrained
model's, channels weighted by supervised attention (`attention=False`: uniform weights).

    xmodal train --config experiments/animals/finetune_delta.py --workdir workdirs/animals_ft_delta
    xmodal train --config experiments/animals/finetune_delta.py:attention=False \
        --workdir workdirs/animals_ft_delta_noatt

Compared layers: the 1x1 projection convolutions that end the 32-, 64-, 96- and 160-channel
stages of MobileNetV2 (blocks 6, 10, 13, 16), as TLlib compares the last convolution of each
ResNet stage. The pretrained model runs in eval mode on the same batch. Attention is computed
once before training from the pretrained model: a new head fitted on its pooled features of 2
training batches, then the loss increase of zeroing each channel (352 forward passes per batch).
weight = 0.01 x batch 32 (TLlib's trade-off 0.01 sums over the batch; here it is a mean).
Figures: the `DELTA` row of `experiments/tables/results/transfer_ablation.md`
(seeds 0, 1, 2, written from their run records by `make tables`).
"""

from experiments.animals.finetune_common import base_config

LAYERS = (
    "block6_project_conv",
    "block10_project_conv",
    "block13_project_conv",
    "block16_project_conv",
)


def get_config(arg=None):
    c, args = base_config(arg, attention=True, weight=0.32)
    c.regularizer = {
        "name": "delta",
        "weight": args.weight,
        "layers": LAYERS,
        "attention": args.attention,
        "attention_batches": 2,
    }
    return c
