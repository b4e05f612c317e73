r"""Full-precision training of the Fashion-MNIST image models (ResNet, MobileNetV2), data-parallel on CPU devices.

  python experiments/train_image.py --config=configs/train_resnet.py --workdir=/tmp/fp_resnet \
      [--config.epochs=2] [--devices=4] [--export_dir=experiments/checkpoints/resnet]

Deterministic given ``config.seed``: epoch e visits the training split in the order
``np.random.default_rng([seed, e]).permutation``, augmentation keys are ``fold_in(key(seed), step)``. An Orbax
checkpoint of (params, batch_stats, opt_state) is written to ``<workdir>/checkpoints`` after every epoch; rerunning
the same command resumes after the last finished epoch. At the end the eval-mode variables go to ``--export_dir``
(Orbax + model.json, see ``flexround_jax.models.zoo``) and a summary is merged into ``--results``.
"""

import os
import sys

from absl import app, flags

flags.DEFINE_integer('devices', 4, 'simulated CPU devices (data parallel); XLA runs a conv on one core per device')
if __name__ == '__main__':  # XLA_FLAGS must be set before jax is imported.
  flags.FLAGS(sys.argv, known_only=True)
  from flexround_jax import cpu  # pylint: disable=g-import-not-at-top
  cpu.use_all_cores(flags.FLAGS.devices)

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from flexround_jax import provenance
from flexround_jax.data import fashion_mnist
from flexround_jax.models import zoo

config_flags.DEFINE_config_file('config', None, 'ml_collections config file (configs/train_*.py)')
flags.DEFINE_string('workdir', None, 'folder for resumable checkpoints and the log', required=True)
flags.DEFINE_string('export_dir', None, 'where the final FP variables go (default: experiments/checkpoints/<model>)')
flags.DEFINE_string('results', None,
                    'JSON file the summary is merged into (default: experiments/results/image_fp.json)')
flags.DEFINE_string('data_dir', None, 'TFDS data_dir holding fashion_mnist_local (default: ~/tensorflow_datasets)')
FLAGS = flags.FLAGS
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def augment(key, images, crop_padding: int, flip: bool):
  """Random translation by up to ``crop_padding`` pixels (zero padding) and horizontal flip; (N, H, W, C) float."""
  n, h, w, _ = images.shape
  k_crop, k_flip = jax.random.split(key)
  if crop_padding:
    p = crop_padding
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * p + 1)
    images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))(padded, offsets)
  if flip:
    images = jnp.where(jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1)), images[:, :, ::-1], images)
  return images


def make_fns(module, tx, config):
  def loss_fn(params, batch_stats, images, labels):
    logits, updates = module.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                                   mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (updates['batch_stats'], jnp.mean(jnp.argmax(logits, -1) == labels))

  @jax.jit
  def train_step(state, images, labels, key):
    images = augment(key, images.astype(jnp.float32) / 255.0, config.crop_padding, config.flip)
    (loss, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], state['batch_stats'], images, labels)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    state = {'params': optax.apply_updates(state['params'], updates), 'batch_stats': batch_stats,
             'opt_state': opt_state, 'step': state['step'] + 1}
    return state, loss, acc

  @jax.jit
  def correct(variables, images, labels):
    return jnp.sum(jnp.argmax(module.apply(variables, images), -1) == labels)

  return train_step, correct


def evaluate(correct, variables, images, labels, batch_size, sharding):
  hits = 0
  n_dev = sharding.mesh.size
  for s in range(0, len(images), batch_size):
    x, y = images[s:s + batch_size], labels[s:s + batch_size]
    pad = (-len(x)) % n_dev  # padded rows get label -1: never counted as correct
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    y = np.concatenate([y, -np.ones(pad, y.dtype)])
    hits += int(correct(variables, jax.device_put(x, sharding), jax.device_put(y, sharding)))
  return hits / len(images)


def main(argv):
  del argv
  config = FLAGS.config
  if not 0 <= config.warmup_epochs < config.epochs:   # optax's cosine decay needs steps left after the warm-up
    raise app.UsageError(f'config.warmup_epochs ({config.warmup_epochs}) must be >= 0 and below config.epochs '
                         f'({config.epochs})')
  workdir = os.path.abspath(FLAGS.workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  data_sh, repl = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  print(f'{jax.device_count()} devices; config:\n{config}', flush=True)

  splits = fashion_mnist.load_splits(data_dir=FLAGS.data_dir)
  x_train, y_train = splits['train']
  steps_per_epoch = len(x_train) // config.batch_size
  if config.max_steps_per_epoch > 0:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
  total = steps_per_epoch * config.epochs

  model_args = config.model_args.to_dict()
  module = zoo.make_image_model(config.model, **model_args)
  variables = module.init(jax.random.key(config.seed), jnp.zeros((1, 28, 28, 1), jnp.float32))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_epochs * steps_per_epoch, total)
  tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                   optax.sgd(schedule, momentum=config.momentum, nesterov=True))
  state = {'params': variables['params'], 'batch_stats': variables['batch_stats'],
           'opt_state': tx.init(variables['params']), 'step': jnp.zeros((), jnp.int32)}
  train_step, correct = make_fns(module, tx, config)

  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), options=ocp.CheckpointManagerOptions(
      max_to_keep=2, enable_async_checkpointing=True))
  start_epoch, wall_before = 0, 0.0
  if mngr.latest_step() is not None:
    abstract = {'state': jax.tree.map(ocp.utils.to_shape_dtype_struct, state),
                'wall_s': jax.ShapeDtypeStruct((), jnp.float32)}
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
    state, wall_before, start_epoch = restored['state'], float(restored['wall_s']), mngr.latest_step()
    print(f'resumed after epoch {start_epoch} ({wall_before:.0f} s so far)', flush=True)
  state = jax.device_put(state, repl)

  t0 = time.time()
  base_key = jax.random.key(config.seed)
  for epoch in range(start_epoch, config.epochs):
    order = np.random.default_rng([config.seed, epoch]).permutation(len(x_train))
    losses, accs, t_epoch = [], [], time.time()
    for i in range(steps_per_epoch):
      idx = np.sort(order[i * config.batch_size:(i + 1) * config.batch_size])
      step = epoch * steps_per_epoch + i
      state, loss, acc = train_step(state, jax.device_put(x_train[idx], data_sh),
                                    jax.device_put(y_train[idx], data_sh), jax.random.fold_in(base_key, step))
      losses.append(loss)
      if (i + 1) % 100 == 0:
        print(f'  step {i + 1}/{steps_per_epoch} loss {float(loss):.4f} {time.time() - t_epoch:.0f} s', flush=True)
      accs.append(acc)
    train_loss, train_acc = float(np.mean(jax.device_get(losses))), float(np.mean(jax.device_get(accs)))
    eval_vars = {'params': state['params'], 'batch_stats': state['batch_stats']}
    val = evaluate(correct, eval_vars, *splits['validation'], config.eval_batch_size, data_sh)
    wall = wall_before + time.time() - t0
    mngr.save(epoch + 1, args=ocp.args.StandardSave({'state': state, 'wall_s': jnp.float32(wall)}))
    print(f'epoch {epoch + 1}/{config.epochs} loss {train_loss:.4f} train_acc {train_acc:.4f} val_top1 {val:.4f} '
          f'epoch_s {time.time() - t_epoch:.1f} wall_s {wall:.0f}', flush=True)
  mngr.wait_until_finished()
  mngr.close()

  eval_vars = jax.device_get({'params': state['params'], 'batch_stats': state['batch_stats']})
  wall = wall_before + time.time() - t0 if start_epoch < config.epochs else wall_before
  val = evaluate(correct, eval_vars, *splits['validation'], config.eval_batch_size, data_sh)
  test = evaluate(correct, eval_vars, *splits['test'], config.eval_batch_size, data_sh)
  export_dir = os.path.abspath(FLAGS.export_dir or os.path.join(REPO, 'experiments', 'checkpoints', config.model))
  zoo.save_image_model(export_dir, config.model, model_args, eval_vars)
  summary = {'model': config.model, 'params': n_params, 'test_top1': test, 'val_top1': val,
             'epochs': config.epochs, 'steps': int(state['step']), 'train_wall_s': round(wall, 1),
             'devices': jax.device_count(), 'config': config.to_dict(), 'checkpoint': os.path.relpath(export_dir, REPO),
             'commit': provenance.git_commit()}
  results = os.path.abspath(FLAGS.results or os.path.join(REPO, 'experiments', 'results', 'image_fp.json'))
  os.makedirs(os.path.dirname(results), exist_ok=True)
  merged = json.load(open(results)) if os.path.exists(results) else {}
  merged[config.model] = summary
  with open(results, 'w') as f:
    json.dump(merged, f, indent=1, default=str)
  print(json.dumps(summary, default=str), flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
