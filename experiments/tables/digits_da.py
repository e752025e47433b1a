"""Digits domain adaptation (MNIST <-> UCI optdigits): every method of experiments/digits/.

    xmodal table experiments/tables/digits_da.py --root workdirs/tables --jobs 2

72 runs (12 configs x 2 directions x seeds 0, 1, 2), 5-15 min each on 2 CPU cores. Target
test accuracy at the final step (`last`): no target labels choose anything. The reference
column is the independent measurement with TLlib's digits recipe on the same two datasets given
in experiments/digits/README.md.
"""

from xmodal_jax.tables import Column, Reference, Row, Table

METHODS = (
    "source_only", "dann", "dan", "jan", "coral", "cdan", "cdan_e", "mcc", "entropy",
    "importance", "adabn", "target_oracle",
)  # fmt: skip
M2U, U2M = "MNIST→UCI", "UCI→MNIST"
SOURCE = (
    "TLlib's digits recipe run on these datasets (3 seeds MNIST→UCI, 2 seeds UCI→MNIST), "
    "experiments/digits/README.md"
)
REFERENCE = {
    "source_only": {M2U: (61.5, 0.4), U2M: (30.4, 1.0)},
    "dann": {M2U: (68.2, 3.1), U2M: (48.3, 1.3)},
    "dan": {M2U: (68.0, 2.0)},  # TLlib's MK-MMD
    "coral": {M2U: (64.2, 1.6)},
    "target_oracle": {M2U: (97.8, 0.2)},
}

TABLE = Table(
    title="Digits domain adaptation: target test accuracy (%)",
    rows=[
        Row(
            label=m,
            config=f"experiments/digits/{m}.py",
            reference=Reference(SOURCE, REFERENCE[m]) if m in REFERENCE else None,
            compete=m != "target_oracle",  # trained on target labels: an upper bound
        )
        for m in METHODS
    ],
    columns=[
        Column(M2U, "eval/target/accuracy", args="direction=m2u"),
        Column(U2M, "eval/target/accuracy", args="direction=u2m"),
    ],
    seeds=(0, 1, 2),
    select="last",
    select_metric="eval/source/accuracy",  # for --select source_val
)
