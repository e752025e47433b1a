"""Domain adaptation on digits: MNIST (5k) and UCI 8x8 digits, both directions."""
