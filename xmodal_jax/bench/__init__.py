"""`xmodal bench`: machine ceilings, train-step speed, MFU and memory of reference workloads.

`cli.run` is the entry point; `measure` holds the counters (XLA cost and memory analysis, timing
loops), `ceilings` the measured peaks, `workloads` our train steps, `torch_ref` the PyTorch
references (imported only for `--torch`).
"""
