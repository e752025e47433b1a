"""LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning"): the image
tower locked (its features cached), MiniLM trained with a projection into a 256-wide space.

    xmodal train --config experiments/animals/lit.py:split=0 --workdir workdirs/animals_lit_s0

One split per run (the trained text tower is shared by the heads of a run); training reads only
the split's seen classes. Figures: the lit row of `experiments/tables/results/animals_zeroshot.md`.
"""

from experiments.animals.common import base_config, one_split


def get_config(arg=None):
    c, _ = base_config(arg, split=0)
    c.model.text.locked = False
    c.model.embed_dim = 256
    c.model.text_proj = {"kind": "linear"}
    c.lr = 1e-4
    c.schedule = [("heads/.*", 1e-3), (".*", "base")]  # heads at 1e-3, MiniLM at 1e-4
    return one_split(c)
