"""Recognition under ImageNet-C corruptions without adaptation, with AdaBN and with TENT.

    xmodal train --config experiments/corruptions/source.py:dataset=digits_mnist \
        --workdir workdirs/corruptions_digits_mnist

A LeNet with BatchNorm trained on the clean `dataset` (`common.py`: `digits_mnist`, the full
MNIST, or `animal_silhouettes`), then evaluated once, at the final step, on the corrupted test
split of every corruption c and severity s (`<dataset>_c/c_s`, built on first use; needs
corrupt-tta: `make install-test`):
- `c_s`: the source model as is (source only);
- `adabn_c_s`: AdaBN, every BatchNorm's statistics re-estimated on the corrupted *train*
  split's images (their labels unused), then the test split;
- `tent_c_s`: TENT (Wang et al., ICLR 2021) online on the corrupted test stream, the settings
  of `experiments/digits/tent.py` (batch 128 in a fixed order, one Adam step at lr 1e-3 per
  batch on the BatchNorm scales and biases, from the trained model for every corruption).
`corruptions=fog+snow` and `severities=3+5` restrict the evaluators (default: all 19 x 5, 285
evaluations at the end of the run; the 95 corrupted datasets are built once per machine).
`experiments/tables/corruptions.py` reads these runs, and `adapt.py` runs of the methods that
train on one corruption at a time.
"""

from experiments.corruptions.common import base_config, corrupted, eval_data
from xmodal_jax.config import parse_arg
from xmodal_jax.data.corruptions import CORRUPTIONS, SEVERITIES


def get_config(arg=None):
    args = parse_arg(
        arg,
        dataset="digits_mnist",
        seed=0,
        corruptions="+".join(CORRUPTIONS),
        severities="+".join(map(str, SEVERITIES)),
    )
    c = base_config(args.dataset, args.seed)
    for corruption in args.corruptions.split("+"):
        for severity in map(int, args.severities.split("+")):
            name = corrupted(args.dataset, corruption, severity)
            test, key = eval_data(name, "test"), f"{corruption}_{severity}"
            c.evals[key] = {"type": "classification", "every": 0, "per_class": False, **test}
            c.evals[f"adabn_{key}"] = {
                **c.evals[key],
                "type": "adabn_classification",
                "adapt": eval_data(name, "train"),
            }
            c.evals[f"tent_{key}"] = {
                **c.evals[key],
                "type": "tent_classification",
                "batch_size": 128,
                "optimizer": "adam",
                "lr": 1e-3,
                "episodic": False,
                "steps": 1,
            }
    return c
