"""Both towers trained: MobileNetV2 (random crops and flips) and MiniLM, projections into a
256-wide space.

    xmodal train --config experiments/animals/unlocked.py:split=0 \
        --workdir workdirs/animals_unlocked_s0

One split per run; training reads only the split's seen classes, so neither tower sees an
unseen-class image. About 2 s per step of 64 on 2 CPU cores. Figures: the unlocked row of
`experiments/tables/results/animals_zeroshot.md`.
"""

from experiments.animals.common import AUGMENTED_PP, IMAGE_PP, base_config, one_split


def get_config(arg=None):
    c, _ = base_config(arg, split=0, batch_size=64, steps=300)
    c.model.image.locked = False
    c.model.text.locked = False
    c.model.image_proj = {"kind": "linear"}
    c.model.text_proj = {"kind": "linear"}
    c.model.embed_dim = 256
    c.data.pp = AUGMENTED_PP
    for ev in c.evals.values():
        ev.pp = IMAGE_PP
    c.lr = 1e-4
    c.schedule = [("heads/.*", 1e-3), (".*", "base")]
    return one_split(c)
