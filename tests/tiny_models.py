"""Tiny Flax models (linen and nnx) for engine tests: an MLP, a CNN with residual blocks, a 2-layer transformer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class MLPBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(self.features)(nn.gelu(nn.Dense(2 * self.features)(x)))


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(32)(x)
    for i in range(2):
      x = MLPBlock(32, name=f'block_{i}')(x)
    return nn.Dense(10)(nn.relu(x))


class ResBlock(nn.Module):
  features: int
  depthwise: bool = False

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.Conv(self.features, (3, 3))(x))
    if self.depthwise:
      y = nn.relu(nn.Conv(self.features, (3, 3), feature_group_count=self.features)(y))
    y = nn.Conv(self.features, (1, 1))(y)
    return nn.relu(x + y)


class CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = ResBlock(8, name='ResBlock_0')(x)
    x = ResBlock(8, depthwise=True, name='ResBlock_1')(x)
    return nn.Dense(5)(x.mean(axis=(1, 2)))


class TransformerLayer(nn.Module):
  heads: int = 2

  @nn.compact
  def __call__(self, x, mask):
    d = x.shape[-1]
    h = nn.LayerNorm()(x)
    q = nn.DenseGeneral((self.heads, d // self.heads), name='query')(h)
    k = nn.DenseGeneral((self.heads, d // self.heads), name='key')(h)
    v = nn.DenseGeneral((self.heads, d // self.heads), name='value')(h)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(d // self.heads)
    logits = jnp.where(mask[:, None, None, :] > 0, logits, -1e9)
    att = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v)
    x = x + nn.DenseGeneral(d, axis=(-2, -1), name='out')(att)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(d, name='fc2')(nn.gelu(nn.Dense(2 * d, name='fc1')(h)))


class Transformer(nn.Module):

  @nn.compact
  def __call__(self, batch):
    x = nn.Embed(50, 16)(batch['ids'])
    for i in range(2):
      x = TransformerLayer(name=f'layer_{i}')(x, batch['mask'])
    return x


class NNXBlock(nnx.Module):

  def __init__(self, d, rngs):
    self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
    self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    return x + self.fc2(nnx.gelu(self.fc1(x)))


class NNXMLP(nnx.Module):

  def __init__(self, rngs):
    self.inp = nnx.Linear(16, 32, rngs=rngs)
    self.block_0 = NNXBlock(32, rngs)
    self.block_1 = NNXBlock(32, rngs)
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(self.block_1(self.block_0(self.inp(x))))


def correlated(key, n, d, rank=4, noise=0.1):
  """Low-rank signal plus a little noise, as real activations are."""
  k1, k2, k3 = jax.random.split(key, 3)
  return jax.random.normal(k1, (n, rank)) @ jax.random.normal(k2, (rank, d)) + noise * jax.random.normal(k3, (n, d))


def mlp():
  model = MLP()
  x = correlated(jax.random.key(0), 256, 16)
  params = model.init(jax.random.key(1), x)['params']
  return params, (lambda p, b: model.apply({'params': p}, b)), x


def cnn():
  model = CNN()
  k1, k2 = jax.random.split(jax.random.key(2))
  base = jax.random.normal(k1, (128, 8, 8, 1))
  x = jax.nn.relu(base + 0.5 * jax.random.normal(k2, (128, 1, 1, 1)))   # correlated pixels
  params = model.init(jax.random.key(3), x)['params']
  return params, (lambda p, b: model.apply({'params': p}, b)), x


def transformer():
  model = Transformer()
  ids = jax.random.randint(jax.random.key(4), (96, 12), 0, 50)
  lengths = jax.random.randint(jax.random.key(5), (96,), 4, 13)
  mask = (jnp.arange(12)[None, :] < lengths[:, None]).astype(jnp.int32)
  batch = {'ids': ids, 'mask': mask}
  params = model.init(jax.random.key(6), batch)['params']
  return params, (lambda p, b: model.apply({'params': p}, b)), batch


def nnx_mlp():
  model = NNXMLP(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  x = correlated(jax.random.key(7), 256, 16)
  return params, (lambda p, b: nnx.merge(graphdef, p)(b)), x
