"""Model zoo: plain Flax models and loaders for real pretrained weights. Knows nothing of quantization."""
