"""Helpers for the tests that compare with a PyTorch implementation (here and in the oracle
subprocesses, which run with this folder on their path)."""

import torch


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Non-trivial weights in place: norms' scales near 1 but not 1 (libraries initialise them
    to 1 / 0, which would hide scale/bias mix-ups), every other parameter `scale` x N(0, 1),
    BatchNorm running statistics set; the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model.eval()
