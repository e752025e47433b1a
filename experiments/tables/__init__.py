"""Result tables: each file defines TABLE for `xmodal table`."""
