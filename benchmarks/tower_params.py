"""Parameter counts of every zoo tower without its classification head (images at 224 px,
texts at the tower's own maximum length), as a record: `benchmarks/results/tower_params.json`.

    .venv/bin/python benchmarks/tower_params.py benchmarks/results/tower_params.json
    make tables   # renders tower_params.md beside it; the README embeds that table

tests/test_towers.py counts every tower again and checks the record, and checks the towers that
have published counts (torchvision, Hugging Face) against those.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from xmodal_jax import provenance
from xmodal_jax.models import layers, zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def body_count(variables) -> int:
    """Parameters outside the classification head (`params/head`), if the tower has one."""
    params = dict(variables.get("params", variables))
    params.pop("head", None)
    return layers.count_params({"params": params})


def count(name: str) -> int:
    text = name.startswith(("bert", "minilm", "clip", "siglip_text"))
    cnn = name.startswith(("resnet", "mobilenet", "modified_resnet", "efficientnet"))
    overrides = {} if cnn else {"scan_layers": True}
    model = zoo.build(name, **overrides)
    x = jnp.zeros((1, 8), jnp.int32) if text else jnp.zeros((1, 224, 224, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    return body_count(variables)


def main(path: str) -> None:
    record = {
        "kind": "tower_params",
        "command": f"python benchmarks/tower_params.py {os.path.relpath(path, ROOT)}",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "git": provenance.git_state(ROOT),
        "versions": provenance.versions(),
        "params": {name: count(name) for name in zoo.names()},
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"{len(record['params'])} towers -> {path}")


if __name__ == "__main__":
    main(sys.argv[1])
