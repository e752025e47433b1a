"""The names of the benchmark's workloads and ablations, apart from their code: `xmodal bench`
parses its arguments (and answers `--help`) from these before it imports JAX."""

STEPS = ("clip", "resnet50", "mnv2_dann", "lenet_dann")  # train steps, defined in `workloads`
# Defined in `ablations`:
ABLATIONS = (
    "scan_remat",
    "donation",
    "bf16",
    "depthwise",
    "residuals",
    "max_pool",
    "conv_forms",
    "cpu_backends",
    "malloc",
)
# Named only, never part of `all`: sized for an accelerator (`ablations.fsdp`, `max_batch`).
ACCELERATOR_ABLATIONS = ("fsdp", "max_batch")
