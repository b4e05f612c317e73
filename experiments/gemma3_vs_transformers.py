r"""Our Gemma 3 270M (``_gguf_gemma3.load_gemma3_gguf``) against transformers' own reading of the same GGUF.

  python experiments/gemma3_vs_transformers.py [--n_tokens=128] [--out=experiments/results/gemma3_vs_transformers.json]

transformers (``make deploy``: torch + transformers) parses the file with its GGUF code (``load_gguf_checkpoint``:
its config mapping, its norm ``- 1``, its dequantization) into a ``Gemma3ForCausalLM`` built from its default Gemma 3
text config (sliding pattern, local RoPE base, query scalar); both models score the first ``n_tokens`` of the
evaluation text (bos first) in float32. An independent check of our tensor map, norm handling and config defaults.
"""

import json
import os
import time

from absl import app, flags
import numpy as np

from flexround_jax import provenance
from flexround_jax.data import wiki
from flexround_jax.evals import perplexity
from flexround_jax.models import _gguf_gemma3

flags.DEFINE_integer('n_tokens', 128, 'tokens scored (bos included)')
flags.DEFINE_string('out', os.path.join(os.path.dirname(__file__), 'results', 'gemma3_vs_transformers.json'), '')
FLAGS = flags.FLAGS


def main(_):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # pylint: disable=g-import-not-at-top
  path = _gguf_gemma3.gemma3_270m_path()
  t0 = time.time()
  config = dict(load_gguf_checkpoint(path, return_tensors=False)['config'])
  for key in ('model_type', 'architectures', '_model_name_or_path'):
    config.pop(key, None)
  hf_model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**config)).eval()
  tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=hf_model)['tensors']
  missing, unexpected = hf_model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()},
                                                 strict=False)
  del tensors
  ours = _gguf_gemma3.load_gemma3_gguf(path)
  text = perplexity.ARTICLE_SEPARATOR.join(wiki.evaluation_articles())
  ids = ours.tokenizer.encode(text[:20 * FLAGS.n_tokens]).ids[:FLAGS.n_tokens]
  with torch.no_grad():
    ref = hf_model(torch.tensor([ids])).logits.float().numpy()[0]
  got = np.asarray(ours.apply_fn(ours.params, np.asarray([ids], np.int32)))[0]
  nll = lambda z: float(np.mean(np.log(np.exp(z[:-1] - z[:-1].max(-1, keepdims=True)).sum(-1))
                                + z[:-1].max(-1) - z[np.arange(len(ids) - 1), ids[1:]]))
  hc = hf_model.config
  result = {
      'n_tokens': len(ids), 'max_abs_logit_diff': float(np.abs(got - ref).max()),
      'max_abs_logit': float(np.abs(ref).max()), 'argmax_agreement': float(np.mean(got.argmax(-1) == ref.argmax(-1))),
      'mean_nll_ours': nll(got), 'mean_nll_transformers': nll(ref),
      'transformers_missing_keys': list(missing), 'transformers_unexpected_keys': list(unexpected),
      'transformers_config': {'layer_types': list(hc.layer_types), 'rope_parameters': hc.rope_parameters,
                              'query_pre_attn_scalar': hc.query_pre_attn_scalar, 'sliding_window': hc.sliding_window},
      'versions': {'transformers': transformers.__version__, 'torch': torch.__version__},
      'wall_s': round(time.time() - t0, 1), 'commit': provenance.git_commit(), 'host': provenance.host_info()}
  with open(FLAGS.out, 'w') as f:
    json.dump(result, f, indent=2, default=str)
  print(json.dumps(result, indent=2, default=str))


if __name__ == '__main__':
  app.run(main)
