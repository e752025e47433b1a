"""AdaBN on digits: LeNet with BatchNorm trained on the source; before evaluating the target,
every BatchNorm's statistics are re-estimated on the (unlabelled) target training split.

    xmodal train --config experiments/digits/adabn.py:direction=m2u,seed=0 \
        --workdir workdirs/digits_adabn_m2u_s0

`eval/target/accuracy` is after AdaBN; `eval/target_no_adabn/accuracy` is the same model with
the source statistics. Results over seeds and both directions: experiments/digits/README.md.
"""

from experiments.digits.digits_common import DIRECTIONS, base_config, domain_data


def get_config(arg=None):
    c = base_config(arg)
    c.model.norm = "batch"
    _, target = DIRECTIONS[c.direction]
    c.evals.target_no_adabn = dict(c.evals.target)
    adapt = domain_data(target, "train", c.direction)
    c.evals.target.type = "adabn_classification"
    c.evals.target.adapt = {"dataset": adapt["name"], "split": "train", "pp": adapt["pp"]}
    return c
