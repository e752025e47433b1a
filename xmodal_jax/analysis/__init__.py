"""Diagnostics of learned representations, not losses: the proxy A-distance between two domains'
features (`a_distance`) and their t-SNE plot (`tsne`). Used by the `a_distance` evaluator."""

import os

# scikit-learn's t-SNE runs OpenMP loops whose idle threads spin by default: on a machine whose
# cores are busy (a table's other jobs, the test workers) the `a_distance` evaluator's plot took
# several times as long as with passive waiting, which costs nothing when the cores are free.
# The OpenMP runtime reads the setting when it loads, which is at the first scikit-learn import
# (after this one); the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
