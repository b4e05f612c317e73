"""The official PyTorch FlexRound loop's step on the SmolLM2-135M decoder layer, on this machine, for comparison with
``bench_engine.py`` (same layer shape, batch 2 x 512 tokens, W4 per-channel, FlexRound on all 7 kernels, Adam).

As in ``onliwad101/FlexRound_LRQ`` (``quant/REM_fast.py`` block loop, ``quant/UniformAffineQuantizer.py``): Hugging
Face's ``LlamaDecoderLayer`` with every Linear's weight replaced by s1 * clamp(round_ste(W / exp(log_s1 + log_s2 +
log_s3)), -zp, 2^b - 1 - zp), eager PyTorch (no torch.compile), float32, Adam over log_s1..3 with a cosine schedule,
block loss = mean over samples of the squared error summed over features. PyTorch uses all cores (intra-op threads).
Writes benchmarks/results/torch_step_cpu.json (median step time, its matmul peak in the same process).

  python benchmarks/bench_torch_step.py [--repeats 20]   (needs `make deploy` for torch + transformers)
"""

import argparse
import json
import os
import time

import numpy as np
import torch
import transformers
from transformers.models.llama import modeling_llama

parser = argparse.ArgumentParser()
parser.add_argument('--repeats', type=int, default=20)
parser.add_argument('--batch', type=int, default=2)
args = parser.parse_args()


def round_ste(x):
  return (x.round() - x).detach() + x


class FlexRoundLinear(torch.nn.Module):
  """The official quantizer on one Linear (per-channel asymmetric min/max grid, zero point fixed)."""

  def __init__(self, linear: torch.nn.Linear, bits: int = 4):
    super().__init__()
    w = linear.weight.detach()
    self.register_buffer('weight', w)
    levels = 2 ** bits - 1
    lo = torch.clamp(w.min(dim=1, keepdim=True).values, max=0)
    hi = torch.clamp(w.max(dim=1, keepdim=True).values, min=0)
    scale = torch.clamp((hi - lo) / levels, min=1e-8)
    self.register_buffer('zero_point', torch.clamp(-torch.round(lo / scale), 0, levels))
    self.levels = levels
    self.log_s1 = torch.nn.Parameter(scale.log())
    self.log_s2 = torch.nn.Parameter(torch.zeros_like(w))
    self.log_s3 = torch.nn.Parameter(torch.zeros_like(scale))

  def forward(self, x):
    w_int = round_ste(self.weight / (self.log_s1 + self.log_s2 + self.log_s3).exp())
    q = torch.clamp(w_int, -self.zero_point, self.levels - self.zero_point)
    return torch.nn.functional.linear(x, self.log_s1.exp() * q)


def median_time(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main():
  torch.manual_seed(0)
  a = torch.randn(2048, 2048)
  peak = 2 * 2048 ** 3 / median_time(lambda: a @ a, args.repeats) / 1e9
  config = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                    num_key_value_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
                                    attn_implementation='sdpa')
  layer = modeling_llama.LlamaDecoderLayer(config, layer_idx=0)
  for parent in [layer.self_attn, layer.mlp]:
    for name, child in list(parent.named_children()):
      if isinstance(child, torch.nn.Linear):
        setattr(parent, name, FlexRoundLinear(child))
  layer.requires_grad_(False)
  params = [p for n, p in layer.named_parameters() if 'log_s' in n]
  for p in params:
    p.requires_grad_(True)
  rotary = modeling_llama.LlamaRotaryEmbedding(config)
  x = torch.randn(args.batch, 512, 576)
  positions = torch.arange(512)[None].expand(args.batch, -1)
  embeddings = rotary(x, positions)
  with torch.no_grad():
    y = layer(x, position_embeddings=embeddings, attention_mask=None, position_ids=positions)
    y = y[0] if isinstance(y, tuple) else y
    y = y + 0.01 * torch.randn_like(y)
  opt = torch.optim.Adam(params, lr=3e-3)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000, eta_min=0)

  def step():
    opt.zero_grad()
    out = layer(x, position_embeddings=embeddings, attention_mask=None, position_ids=positions)
    out = out[0] if isinstance(out, tuple) else out
    loss = (out - y).pow(2).sum(-1).mean()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()

  t = median_time(step, args.repeats)
  row = {'block': f'smollm2_layer_576_seq512_b{args.batch}', 'framework': f'torch {torch.__version__} eager',
         'transformers': transformers.__version__, 'threads': torch.get_num_threads(), 'step_ms': round(t * 1e3, 2),
         'matmul_2048_f32_gflops': round(peak, 1)}
  print(json.dumps(row))
  path = os.path.join(os.path.dirname(__file__), 'results', 'torch_step_cpu.json')
  with open(path, 'w') as f:
    json.dump(row, f, indent=2)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
