"""Paper tables: `xmodal table experiments/tables/NAME.py --root DIR` runs a table's jobs
(configs x seeds x grid) resumably and writes it as markdown, LaTeX and CSV."""

from xmodal_jax.tables.spec import Column, Reference, Row, Table

__all__ = ["Column", "Reference", "Row", "Table"]
