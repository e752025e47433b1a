"""Source only: LeNet trained on the source digits, evaluated on both domains' test splits.

    xmodal train --config experiments/digits/source_only.py:direction=m2u,seed=0 \
        --workdir workdirs/digits_source_only_m2u_s0

Measured (final step, 2,000 steps of batch 64):
- seed 0, MNIST→UCI, 2 CPU cores (`make quickstart`): eval/source/accuracy 0.980,
  eval/target/accuracy 0.600, 1 min 42 s wall including set-up checks and evaluation;
- seeds 0-2 (16-core H100 host): MNIST→UCI target 62.0 ± 2.6 (source 97.8 ± 0.1),
  UCI→MNIST target 29.5 ± 0.8 (source 98.3 ± 0.3). Full table: experiments/digits/README.md.
"""

from experiments.digits.digits_common import base_config


def get_config(arg=None):
    return base_config(arg)
