"""Office-31 domain adaptation with ResNet-50 (a manual download)."""
