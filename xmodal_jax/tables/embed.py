"""Tables embedded in documents, kept equal to the generated tables.

A document holds a generated table between two markers:

    <!-- table: experiments/tables/results/NAME.md -->
    ...
    <!-- /table -->

`python -m xmodal_jax.tables.embed` (run by `make tables`) rewrites what lies between them with
the file named (its `# title` line shown in bold), so a figure in a document is never typed by
hand; a test checks that every document is current.
"""

from __future__ import annotations

import os
import re
import sys

from xmodal_jax.errors import UserError

# The documents that embed tables (paths from the repository root).
DOCUMENTS = (
    "README.md",
    "experiments/digits/README.md",
    "experiments/animals/FINETUNE.md",
    "experiments/animals/SHIFT.md",
    "BENCHMARKS.md",
)

_BLOCK = re.compile(r"(<!-- table: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _table_text(path: str) -> str:
    with open(path) as f:
        lines = f.read().rstrip("\n").split("\n")
    if lines and lines[0].startswith("# "):
        lines[0] = f"**{lines[0][2:]}**"
    return "\n".join(lines) + "\n"


def embed(text: str, root: str) -> str:
    """`text` with every marked block replaced by the current table it names."""

    def replace(m: re.Match) -> str:
        path = os.path.join(root, m.group("path"))
        if not os.path.exists(path):
            raise UserError(f"A document embeds {m.group('path')}, which does not exist.")
        return m.group(1) + _table_text(path) + m.group(4)

    return _BLOCK.sub(replace, text)


def count(text: str) -> int:
    return len(_BLOCK.findall(text))


def main(argv: list[str] | None = None) -> int:
    root = os.getcwd()
    for doc in argv or DOCUMENTS:
        path = os.path.join(root, doc)
        with open(path) as f:
            text = f.read()
        new = embed(text, root)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
            print(f"Updated the tables embedded in {doc}.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
