"""Digit shifts from the full MNIST: to UCI optdigits, MNIST-M-like and SynDigits-like.

    xmodal table experiments/tables/digits_shift.py --root workdirs/tables --jobs 2 \
        --records experiments/tables/results/digits_shift.runs.jsonl

Every method of experiments/digits/ (the rows and trade-off grids of `digits_da.py`) with the
full MNIST as source (`digits_mnist`: trained on its 50,000 train images, validated on its
10,000 validation images) and three targets, seen unlabelled through their train split and
reported on their test split: UCI optdigits (grey), MNIST-M-like and SynDigits-like (colour;
MNIST is repeated to three channels beside them). 189 runs (21 row-grid points x 3 targets x 3
seeds; their time: the compute line under the table). Target test accuracy at the final step; a
grid row's trade-off is the point with the best mean source validation accuracy. The reference
is the DANN paper's MNIST→MNIST-M (Ganin et al., JMLR 2016, Table 2): the original MNIST-M,
built from BSDS500 photographs, is different target data from our MNIST-M-like (four
photographs), so it is context, not a figure to match.
The A-distance columns are the proxy A-distance 2(1 - 2e) of a logistic domain classifier on the
final model's pooled features of the two test splits (the `a_distance` evaluator; Ben-David et
al., NeurIPS 2006): about 2 while the domains stay separable, lower as they align, which is not
by itself a better accuracy. AdaBN's are those of its model (each domain through its own
BatchNorm statistics); "BatchNorm source" gives the same runs' model as trained; TENT has none
(its model changes along the test stream).
"""

import dataclasses

from experiments.tables.digits_da import rows
from xmodal_jax.tables import Column, Reference, Table

MF2U, MF2MM, MF2SYN = "MNIST→UCI", "MNIST→MNIST-M-like", "MNIST→SynDigits-like"
SOURCE = "Ganin et al., JMLR 2016, Table 2, MNIST→MNIST-M (different target data: BSDS500 patches)"
REFERENCE = {
    "source_only": {MF2MM: 52.25},
    "dann": {MF2MM: 76.66},
    "target_oracle": {MF2MM: 95.96},
}

DIRECTIONS = ((MF2U, "direction=mf2u"), (MF2MM, "direction=mf2mm"), (MF2SYN, "direction=mf2syn"))
ACCURACY = [label for label, _ in DIRECTIONS]
A_DISTANCE = [f"A-distance {label}" for label, _ in DIRECTIONS]


def _rows() -> list:
    """`digits_da`'s rows. AdaBN and TENT adapt only in their target evaluators: their runs'
    `a_distance` is of the unadapted BatchNorm LeNet, so it fills that source row's columns;
    AdaBN's row reads the A-distance of AdaBN's model (`a_distance_adabn`), and TENT's has none
    (its model changes along the test stream)."""
    out = []
    for row in rows(ACCURACY):
        if row.label == "adabn":
            adabn = dict.fromkeys(A_DISTANCE, "eval/a_distance_adabn/value")
            row = dataclasses.replace(row, metrics={**row.metrics, **adabn})
        if row.label == "tent":
            row = dataclasses.replace(row, columns=ACCURACY)
        if row.label in REFERENCE:
            row = dataclasses.replace(row, reference=Reference(SOURCE, REFERENCE[row.label]))
        out.append(row)
    return out


TABLE = Table(
    title="Digit shifts from the full MNIST: target test accuracy (%)",
    rows=_rows(),
    columns=[
        *(Column(label, "eval/target/accuracy", args=arg) for label, arg in DIRECTIONS),
        *(
            Column(
                a_label,
                "eval/a_distance/value",
                args=arg,
                scale=1,
                digits=3,
                higher_is_better=False,
                bold=False,
            )
            for a_label, (_, arg) in zip(A_DISTANCE, DIRECTIONS, strict=True)
        ),
    ],
    seeds=(0, 1, 2),
    select="last",
    baseline="source_only",  # each cell's difference to it, with its standard error
    select_metric="eval/source_val/accuracy",  # MNIST's validation split
)
