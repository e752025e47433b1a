"""AdaBN on digits: LeNet with BatchNorm trained on the source; before evaluating the target,
every BatchNorm's statistics are re-estimated on the (unlabelled) target training split.

    xmodal train --config experiments/digits/adabn.py:direction=m2u,seed=0 \
        --workdir workdirs/digits_adabn_m2u_s0

`eval/target/accuracy` is after AdaBN; `eval/target_no_adabn/accuracy` is the same model with
the source statistics. Likewise `eval/a_distance_adabn/value` is the proxy A-distance of AdaBN's
model (the target's features through the re-estimated statistics, the source's through the
source ones), `eval/a_distance/value` that of the model as trained. Results over seeds and
directions: experiments/digits/README.md.
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
    c.evals.a_distance_adabn = {**c.evals.a_distance.to_dict(), "adapt": c.evals.target.adapt}
    return c
