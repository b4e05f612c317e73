"""Model zoo: plain Flax models and loaders for real pretrained weights. Knows nothing of quantization."""

from flexround_jax.models.fold_bn import fold_batch_norm
from flexround_jax.models.mobilenetv2 import MobileNetV2
from flexround_jax.models.resnet import ResNet
from flexround_jax.models.zoo import load_image_model, make_image_model, save_image_model
from flexround_jax.models.decoder import Decoder, DecoderConfig, Rope
from flexround_jax.models.hf import load_hf
from flexround_jax.models.gguf import load_gguf
