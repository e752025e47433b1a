"""Diagnostics of learned representations, not losses: the proxy A-distance between two domains'
features (`a_distance`) and their t-SNE plot (`tsne`). Used by the `a_distance` evaluator."""
