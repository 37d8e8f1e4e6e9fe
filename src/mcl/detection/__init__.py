"""Detection transfer: a small real detection set built from Fashion-MNIST, and dataset analysis."""
