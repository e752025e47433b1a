"""Full fine-tuning with L2-SP (Li, Grandvalet & Davoine, ICML 2018).

    xmodal train --config experiments/animals/finetune_l2sp.py --workdir workdirs/animals_ft_l2sp

`alpha/2 ||w - w0||^2` over the backbone, towards the ImageNet weights `w0` loaded at init, plus
`beta/2 ||w_head||^2` on the new head; alpha = beta = 0.01 (the trade-offs of the TLlib recipe).
Figures: the `L2-SP` row of `experiments/tables/results/transfer_ablation.md`
(seeds 0, 1, 2, written from their run records by `make tables`).
"""

from experiments.animals.finetune_common import base_config


def get_config(arg=None):
    c, args = base_config(arg, alpha=0.01, beta=0.01)
    c.regularizer = {"name": "l2sp", "alpha": args.alpha, "beta": args.beta}
    return c
