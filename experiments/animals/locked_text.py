"""Locked text tower, trained image tower: MobileNetV2 fine-tuned (random crops and flips) to
MiniLM's fixed class-prompt embeddings.

    xmodal train --config experiments/animals/locked_text.py:split=0 \
        --workdir workdirs/animals_locked_text_s0

One split per run; training reads only the split's seen classes, so the tower (its gradients
and BatchNorm statistics) never sees an unseen-class image. MobileNetV2 forward and backward at
112 px is the cost here (about 2 s per step of 64 on 2 CPU cores). Figures: the locked_text row
of `experiments/tables/results/animals_zeroshot.md`.
"""

from experiments.animals.common import AUGMENTED_PP, IMAGE_PP, base_config, one_split


def get_config(arg=None):
    c, _ = base_config(arg, split=0, batch_size=64, steps=300)
    c.model.image.locked = False
    c.model.image_proj = {"kind": "linear"}
    c.data.pp = AUGMENTED_PP
    for ev in c.evals.values():
        ev.pp = IMAGE_PP
    c.lr = 1e-4
    c.schedule = [("heads/.*", 1e-3), (".*", "base")]
    return one_split(c)
