"""Experiment configs (`xmodal train --config experiments/...`) and result tables.

A package, so configs share helpers by module path (`from experiments.digits.digits_common
import base_config`); `xmodal` puts the folder above it on the import path when it loads one.
"""
