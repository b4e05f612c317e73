"""One decoder-only transformer in Flax linen for the Hugging Face families Llama (3.x), Mistral, Qwen2(.5), Qwen3
and Gemma 3 (text): a typed ``DecoderConfig`` of switches, not one model file per family.

Layout (as ``models/llama.py``): ``embed_tokens`` (vocab, d) -> ``layers_0`` .. ``layers_{L-1}`` -> ``norm`` ->
logits, (B, T) int tokens -> (B, T, vocab) float32; the LM head is ``embed_tokens.attend`` (tied) or ``lm_head``
(Dense kernel (d, vocab)). Each ``layers_<i>`` holds ``input_layernorm``, ``attn`` {``q_proj``, ``k_proj``,
``v_proj``, ``o_proj`` (Dense kernels (in, out), biases where the family has them), ``q_norm``, ``k_norm`` (per
head, over head_dim; Qwen3, Gemma 3)}, ``post_attention_layernorm``, (Gemma 3: ``pre_feedforward_layernorm``,
``post_feedforward_layernorm``) and ``mlp`` {``gate_proj``, ``up_proj``, ``down_proj``}. A block maps hidden states
alone, (B, T, d) -> (B, T, d): the causal (and sliding-window) mask and positions ``arange(T)`` are built inside, so
the quantization engine selects blocks with ``BLOCK_REGEX`` and re-applies one on its recorded input.

The math follows transformers' modeling code (``models/{llama,mistral,qwen2,qwen3,gemma3}/modeling_*.py``):
RMSNorm normalises in float32 and casts back (Llama: ``w * norm(x).astype(x.dtype)``; Gemma: ``(norm(x) * (1 +
w)).astype(x.dtype)``); RoPE is the rotate-half form with ``inv_freq`` computed in float32; attention softmax runs in
float32; a sliding-window layer lets query i see keys j with i - window < j <= i (transformers' masking_utils).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BLOCK_REGEX = r'layers_\d+'
FULL, SLIDING = 'full_attention', 'sliding_attention'
ROPE_TYPES = ('default', 'linear', 'llama3')
ACTIVATIONS = ('silu', 'gelu_pytorch_tanh')


@dataclasses.dataclass(frozen=True)
class Rope:
  """Rotary embedding of one kind of layer: ``base`` (HF ``rope_theta``) and the scaling of transformers'
  ``ROPE_INIT_FUNCTIONS``: 'default' (none), 'linear' (inv_freq / factor) or 'llama3' (``factor``,
  ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``)."""
  base: float = 10000.0
  rope_type: str = 'default'
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f'Rope.rope_type={self.rope_type!r} is not supported (supported: {ROPE_TYPES})')
    if not self.base > 0:
      raise ValueError(f'Rope.base={self.base} must be > 0')
    if not self.factor > 0:
      raise ValueError(f'Rope.factor={self.factor} must be > 0')
    if not self.original_max_position_embeddings > 0:
      raise ValueError(f'Rope.original_max_position_embeddings={self.original_max_position_embeddings} must be > 0')
    if self.rope_type == 'llama3' and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(f'Rope.high_freq_factor={self.high_freq_factor} must exceed low_freq_factor='
                       f'{self.low_freq_factor} (llama3 scaling divides by their difference)')

  def inv_freq(self, head_dim: int) -> np.ndarray:
    """(head_dim / 2,) float32 inverse frequencies, as transformers computes them (float32 throughout)."""
    f32 = np.float32
    inv = f32(1.0) / (f32(self.base) ** (np.arange(0, head_dim, 2).astype(f32) / f32(head_dim)))
    if self.rope_type == 'linear':
      return (inv / f32(self.factor)).astype(f32)
    if self.rope_type == 'default':
      return inv.astype(f32)
    # transformers' _compute_llama3_parameters, step for step.
    old = self.original_max_position_embeddings
    low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
    wavelen = f32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / f32(self.factor), inv).astype(f32)
    smooth = ((old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)).astype(f32)
    smoothed = ((1 - smooth) * scaled / f32(self.factor) + smooth * scaled).astype(f32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a ``Decoder``; ``from_hf`` fills it from a Hugging Face ``config.json``.

  Fields: sizes (``vocab_size``, ``hidden_size``, ``num_layers``, ``num_heads``, ``num_kv_heads`` (grouped-query:
  query head h uses kv head h // (num_heads / num_kv_heads)), ``head_dim`` (explicit: Qwen3 / Gemma 3 have
  num_heads * head_dim != hidden_size), ``intermediate_size``); ``norm_eps``; ``norm_unit_offset`` (Gemma: norms
  scale by 1 + w); ``sandwich_norms`` (Gemma: post-attention and pre/post-feedforward norms, four per layer);
  ``qk_norm`` (RMSNorm of q and k per head before RoPE); ``qkv_bias`` / ``o_bias`` / ``mlp_bias``; ``activation``
  ('silu': SwiGLU, 'gelu_pytorch_tanh': GeGLU); ``embed_scale`` (Gemma: embeddings times sqrt(hidden_size) in their
  own dtype); ``tie_embeddings``; ``rope`` (full-attention layers) and ``rope_local`` (sliding layers; None: the same
  as ``rope``); ``sliding_window`` and ``layer_types`` (one of 'full_attention' / 'sliding_attention' per layer);
  ``query_pre_attn_scalar`` (scores scaled by its -1/2 power; None: head_dim ** -0.5); ``model_type`` (the HF
  family, informative).
  """
  vocab_size: int = 256
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  intermediate_size: int = 128
  norm_eps: float = 1e-5
  norm_unit_offset: bool = False
  sandwich_norms: bool = False
  qk_norm: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  activation: str = 'silu'
  embed_scale: bool = False
  tie_embeddings: bool = True
  rope: Rope = Rope()
  rope_local: Rope | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  query_pre_attn_scalar: float | None = None
  model_type: str = 'llama'

  def __post_init__(self):
    for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
                 'intermediate_size'):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f'DecoderConfig.{name}={v!r} must be a positive integer')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'DecoderConfig.num_heads={self.num_heads} must be a multiple of '
                       f'num_kv_heads={self.num_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'DecoderConfig.head_dim={self.head_dim} must be even (RoPE rotates pairs)')
    if not self.norm_eps > 0:
      raise ValueError(f'DecoderConfig.norm_eps={self.norm_eps} must be > 0')
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'DecoderConfig.activation={self.activation!r} is not supported (supported: {ACTIVATIONS})')
    if not isinstance(self.rope, Rope) or not isinstance(self.rope_local, (Rope, type(None))):
      raise ValueError(f'DecoderConfig.rope / rope_local must be Rope values, got {self.rope!r} / '
                       f'{self.rope_local!r}')
    if self.sliding_window is not None and (not isinstance(self.sliding_window, (int, np.integer))
                                            or self.sliding_window < 1):
      raise ValueError(f'DecoderConfig.sliding_window={self.sliding_window!r} must be a positive integer or None')
    if self.layer_types is not None:
      if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.num_layers:
        raise ValueError(f'DecoderConfig.layer_types must be a tuple of num_layers={self.num_layers} entries, got '
                         f'{self.layer_types!r}')
      bad = [t for t in self.layer_types if t not in (FULL, SLIDING)]
      if bad:
        raise ValueError(f'DecoderConfig.layer_types has {bad[0]!r}; each entry must be {FULL!r} or {SLIDING!r}')
      if SLIDING in self.layer_types and self.sliding_window is None:
        raise ValueError('DecoderConfig.layer_types has sliding_attention layers but sliding_window is None')
    if self.query_pre_attn_scalar is not None and not self.query_pre_attn_scalar > 0:
      raise ValueError(f'DecoderConfig.query_pre_attn_scalar={self.query_pre_attn_scalar} must be > 0 or None')

  def layer_type(self, i: int) -> str:
    """'full_attention' or 'sliding_attention' of layer i (no ``layer_types``: every layer slides if
    ``sliding_window`` is set, as Mistral)."""
    if self.layer_types is not None:
      return self.layer_types[i]
    return FULL if self.sliding_window is None else SLIDING

  @classmethod
  def from_hf(cls, config_json: dict) -> 'DecoderConfig':
    """The config of a Hugging Face ``config.json`` (a dict); see ``hf.decoder_config`` for what is read and refused."""
    from flexround_jax.models import hf  # pylint: disable=g-import-not-at-top
    return hf.decoder_config(config_json)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis, normalised in float32 and cast back to the input dtype, as transformers does.

  ``unit_offset`` False (Llama): ``scale * norm(x).astype(x.dtype)``, scale initialised to 1; True (Gemma):
  ``(norm(x) * (1 + scale)).astype(x.dtype)``, scale initialised to 0. Param ``scale`` (features,).
  """
  eps: float
  unit_offset: bool = False

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.zeros if self.unit_offset else nn.initializers.ones, (x.shape[-1],))
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    if self.unit_offset:
      return (h * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    return scale * h.astype(x.dtype)


def rope_angles(rope: Rope, t: int, head_dim: int):
  """(cos, sin), each (T, head_dim) float32, of positions arange(T): HF's cat(freqs, freqs) layout."""
  freqs = jnp.arange(t, dtype=jnp.float32)[:, None] * jnp.asarray(rope.inv_freq(head_dim))[None, :]
  emb = jnp.concatenate([freqs, freqs], -1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """Rotate-half RoPE of x (B, T, heads, head_dim) with cos / sin (T, head_dim), cast to x's dtype."""
  cos, sin = cos[None, :, None, :].astype(x.dtype), sin[None, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def attention_mask(t: int, window: int | None):
  """(T, T) bool, True where query i may see key j: j <= i, and i - window < j with a sliding window."""
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  mask = j <= i
  if window is not None:
    mask &= j > i - window
  return jnp.asarray(mask)


class Attention(nn.Module):
  """Causal grouped-query self-attention with RoPE (full or sliding window); (B, T, d) -> (B, T, d)."""
  config: DecoderConfig
  sliding: bool = False

  @nn.compact
  def __call__(self, x):
    c = self.config
    b, t, _ = x.shape
    hd = c.head_dim
    dense = lambda n, bias, name: nn.Dense(n, use_bias=bias, name=name)
    q = dense(c.num_heads * hd, c.qkv_bias, 'q_proj')(x).reshape(b, t, c.num_heads, hd)
    k = dense(c.num_kv_heads * hd, c.qkv_bias, 'k_proj')(x).reshape(b, t, c.num_kv_heads, hd)
    v = dense(c.num_kv_heads * hd, c.qkv_bias, 'v_proj')(x).reshape(b, t, c.num_kv_heads, hd)
    if c.qk_norm:
      q = RMSNorm(c.norm_eps, c.norm_unit_offset, name='q_norm')(q)
      k = RMSNorm(c.norm_eps, c.norm_unit_offset, name='k_norm')(k)
    rope = c.rope_local if self.sliding and c.rope_local is not None else c.rope
    cos, sin = rope_angles(rope, t, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = self.attend(q, k, v, attention_mask(t, c.sliding_window if self.sliding else None))
    return dense(c.hidden_size, c.o_bias, 'o_proj')(out)

  def attend(self, q, k, v, mask):
    """Grouped-query attention of (B, T, heads, hd) queries over (B, T, kv heads, hd) keys and values under a
    (T, T) mask; returns (B, T, heads * hd). Query groups are folded into rows as ``llama.Attention.attend``."""
    c = self.config
    b, t = q.shape[:2]
    groups = c.num_heads // c.num_kv_heads
    q = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(b, c.num_kv_heads, groups * t, c.head_dim)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                      # (B, kv, T, hd)
    scalar = c.head_dim if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar
    scores = jnp.einsum('bkrd,bksd->bkrs', q, k) * np.float32(scalar ** -0.5).astype(q.dtype)
    scores = jnp.where(jnp.tile(mask, (groups, 1)), scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum('bkrs,bksd->bkrd', probs, v).reshape(b, c.num_kv_heads, groups, t, c.head_dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, c.num_heads * c.head_dim)


class MLP(nn.Module):
  """Gated feed-forward down(act(gate(x)) * up(x)): SwiGLU (silu) or GeGLU (tanh GELU); (B, T, d) -> (B, T, d)."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = nn.Dense(c.intermediate_size, use_bias=c.mlp_bias, name='gate_proj')(x)
    up = nn.Dense(c.intermediate_size, use_bias=c.mlp_bias, name='up_proj')(x)
    act = nn.silu(gate) if c.activation == 'silu' else nn.gelu(gate, approximate=True)
    return nn.Dense(c.hidden_size, use_bias=c.mlp_bias, name='down_proj')(act * up)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)); with ``sandwich_norms`` each branch's output is
  normed again (Gemma: post_attention_layernorm after attention, pre/post_feedforward_layernorm around the MLP).
  (B, T, d) -> (B, T, d)."""
  config: DecoderConfig
  sliding: bool = False

  @nn.compact
  def __call__(self, x):
    c = self.config
    norm = lambda name: RMSNorm(c.norm_eps, c.norm_unit_offset, name=name)
    h = Attention(c, self.sliding, name='attn')(norm('input_layernorm')(x))
    if c.sandwich_norms:
      x = x + norm('post_attention_layernorm')(h)
      return x + norm('post_feedforward_layernorm')(MLP(c, name='mlp')(norm('pre_feedforward_layernorm')(x)))
    x = x + h
    return x + MLP(c, name='mlp')(norm('post_attention_layernorm')(x))


class Decoder(nn.Module):
  """Decoder-only LM; (B, T) int tokens -> (B, T, vocab) float32 logits."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, tokens):
    c = self.config
    embed = nn.Embed(c.vocab_size, c.hidden_size, name='embed_tokens')
    x = embed(tokens)
    if c.embed_scale:   # transformers multiplies by sqrt(hidden) cast to the embedding's dtype
      x = x * jnp.asarray(c.hidden_size ** 0.5, dtype=x.dtype)
    for i in range(c.num_layers):
      x = DecoderLayer(c, c.layer_type(i) == SLIDING, name=f'layers_{i}')(x)
    x = RMSNorm(c.norm_eps, c.norm_unit_offset, name='norm')(x)
    logits = embed.attend(x) if c.tie_embeddings else nn.Dense(c.vocab_size, use_bias=False, name='lm_head')(x)
    return logits.astype(jnp.float32)


def make_decoder(config: DecoderConfig | None = None, seed: int = 0):
  """A randomly initialised ``Decoder`` (default: the tiny ``DecoderConfig()``, for tests) -> (module, params)."""
  module = Decoder(config or DecoderConfig())
  params = module.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))['params']
  return module, params
