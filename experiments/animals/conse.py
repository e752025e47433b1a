"""ConSE (Norouzi et al., ICLR 2014): the training-free baseline of the zero-shot rows.

    xmodal train --config experiments/animals/conse.py --workdir workdirs/animals_conse

The quick start's locked towers as they are: MobileNetV2's own ImageNet-1k classifier gives each
test silhouette its 10 most probable ImageNet classes, MiniLM embeds their names and the animal
names (the quick start's 10 prompt templates, averaged), and each image goes to the unseen class
of its split whose name is nearest the probability-weighted mean of its top-10 name embeddings
(`eval/conse/accuracy`, mean over the 5 splits; per split `eval/conse/split_k/accuracy`).
Nothing trained is used: the run takes one step only because every run trains. Figures: the
ConSE row of `experiments/tables/results/animals_zeroshot.md`.
"""

from experiments.animals.common import base_config


def get_config(arg=None):
    c, _ = base_config(arg, steps=1)
    c.evals = {"conse": {**c.evals["zeroshot_unseen"], "type": "conse", "top_t": 10}}
    c.checkpoint_every = 0
    return c
