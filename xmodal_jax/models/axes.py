"""Logical axis names used to annotate every tower parameter.

Parameters are created through `nn.with_logical_partitioning` with these names only; the mesh
rules in `xmodal_jax/parallel/` map them to mesh axes (`data`, `fsdp`, `model`). Any dimension
not listed (spatial conv dims, a projection's output, a stacked position table) is `None`.
"""

EMBED = "embed"  # model width: token features, residual stream, pooled CNN features
MLP = "mlp"  # hidden width of a transformer MLP block
HEADS = "heads"  # attention heads
KV = "kv"  # per-head query/key/value width
VOCAB = "vocab"  # rows of a token embedding table
CLASSES = "classes"  # outputs of a classifier head
CONV_IN = "conv_in"  # input channels of a conv kernel
CONV_OUT = "conv_out"  # output channels of a conv kernel (and a conv bias)
NORM = "norm"  # scale and bias of LayerNorm / BatchNorm / GroupNorm
LAYERS = "layers"  # the leading axis that `nn.scan` adds to stacked transformer layers

ALL = (EMBED, MLP, HEADS, KV, VOCAB, CLASSES, CONV_IN, CONV_OUT, NORM, LAYERS)
