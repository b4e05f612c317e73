"""flexround_jax: post-training quantization for JAX/Flax with learned rounding."""
