"""Writes tests/fixtures/hf/<family>/: a tiny random Hugging Face checkpoint per decoder family, built offline by
transformers, plus ``reference.npz`` (tokens (1, T) int32, logits (1, T, vocab) float32 from transformers' eager
forward). Needs torch and transformers (``make deploy``). Run from the repository root:

  python experiments/make_hf_fixtures.py [--out tests/fixtures/hf] [--family llama ...]

Every model: float32, 2-3 layers, width 48, 3 query heads over 1 kv head, head_dim 16 (Qwen3, Gemma 3: 24, so
heads * head_dim != width), vocab 256, seeded; T = 40 tokens in [3, 250), longer than every sliding window (Mistral
16, Qwen3 16 on layer 1 only (``use_sliding_window``, ``max_window_layers`` 1), Gemma 3 12). Qwen2 is saved in
shards (``max_shard_size``) so the index path is tested. ``gemma3_multimodal`` is a Gemma3ForConditionalGeneration
(the gemma3 text model under a tiny vision tower), saved as transformers saves it (``language_model.model.*``,
``vision_tower.*``).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

SEQ_LEN = 40
COMMON = dict(vocab_size=256, hidden_size=48, intermediate_size=80, num_attention_heads=3, num_key_value_heads=1,
              head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)


FAMILIES = ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma3', 'gemma3_multimodal')


def family_configs() -> dict:
  """{family: (config class name, model class name, config kwargs, save_pretrained kwargs)}."""
  return {
      'llama': ('LlamaConfig', 'LlamaForCausalLM', dict(
          COMMON, num_hidden_layers=2, tie_word_embeddings=False,
          rope_parameters=dict(rope_type='llama3', rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=32)), {}),
      'mistral': ('MistralConfig', 'MistralForCausalLM', dict(
          COMMON, num_hidden_layers=2, sliding_window=16, tie_word_embeddings=False,
          rope_parameters=dict(rope_type='default', rope_theta=10000.0)), {}),
      'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM', dict(
          COMMON, num_hidden_layers=2, tie_word_embeddings=True,
          rope_parameters=dict(rope_type='default', rope_theta=1000000.0)), dict(max_shard_size='40KB')),
      'qwen3': ('Qwen3Config', 'Qwen3ForCausalLM', dict(
          COMMON, num_hidden_layers=2, tie_word_embeddings=False, attention_bias=False, head_dim=24,
          use_sliding_window=True, sliding_window=16, max_window_layers=1,
          rope_parameters=dict(rope_type='default', rope_theta=1000000.0)), {}),
      'gemma3': ('Gemma3TextConfig', 'Gemma3ForCausalLM', dict(
          COMMON, num_hidden_layers=3, sliding_window=12, query_pre_attn_scalar=20, head_dim=24,
          layer_types=['sliding_attention', 'full_attention', 'sliding_attention'],
          hidden_activation='gelu_pytorch_tanh', tie_word_embeddings=True,
          rope_parameters={'full_attention': dict(rope_type='linear', factor=2.0, rope_theta=1000000.0),
                           'sliding_attention': dict(rope_type='default', rope_theta=10000.0)}), {}),
  }


def _gemma3_multimodal(transformers):
  """Gemma3ForConditionalGeneration: the gemma3 text config under a one-layer SigLIP tower (image 28, patch 14,
  4 image tokens); its special tokens (251-253) lie above the test tokens."""
  text = transformers.Gemma3TextConfig(**family_configs()['gemma3'][2])
  vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14)
  return transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                   boi_token_index=251, eoi_token_index=252, image_token_index=253)


def make_fixture(family: str, out: str, seed: int = 0) -> str:
  """Builds, saves and runs one family's tiny model; returns its folder."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  if family == 'gemma3_multimodal':
    model_cls, save_kwargs, config = 'Gemma3ForConditionalGeneration', {}, _gemma3_multimodal(transformers)
  else:
    config_cls, model_cls, kwargs, save_kwargs = family_configs()[family]
    config = getattr(transformers, config_cls)(**kwargs)
  config._attn_implementation = 'eager'   # pylint: disable=protected-access
  model = getattr(transformers, model_cls)(config).eval().to(torch.float32)
  with torch.no_grad():   # random norm weights (HF initialises them to 1 / 0, which would hide a wrong (1 + w))
    for name, p in model.named_parameters():
      if 'norm' in name or name.endswith('.bias'):
        p.add_(0.1 * torch.randn_like(p))
  folder = os.path.join(out, family)
  os.makedirs(folder, exist_ok=True)
  model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
  tokens = np.random.default_rng(seed).integers(3, 250, (1, SEQ_LEN)).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()
  np.savez(os.path.join(folder, 'reference.npz'), tokens=tokens, logits=logits.astype(np.float32))
  return folder


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join('tests', 'fixtures', 'hf'))
  parser.add_argument('--family', nargs='*', default=FAMILIES)
  args = parser.parse_args()
  for family in args.family:
    print(make_fixture(family, args.out))


if __name__ == '__main__':
  main()
