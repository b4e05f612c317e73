"""Subprocess worker for multi-device / multi-process tests. Usage:
  python _multi_worker.py devices OUT.npz              (one process, 8 CPU devices: 1-device vs 8-device runs)
  python _multi_worker.py model OUT.npz                (8 CPU devices as 2 data x 4 model vs 1 device)
  python _multi_worker.py sharded OUT.npz              (params placed by the user over 8 devices vs unplaced)
  python _multi_worker.py process PID NPROC PORT OUT   (jax.distributed; each process holds its shard of the data)
  python _multi_worker.py resume CKPT OUT              (a checkpointed run; may be SIGKILLed and rerun)
"""

import os
import sys

mode = sys.argv[1]
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=' + ('8' if mode in ('devices', 'model', 'sharded') else '2')
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import flexround_jax as fr  # noqa: E402
import tiny_models  # noqa: E402


def config(**kw):
  return fr.QuantConfig(method=fr.methods.flexround(lr=5e-3), weight=fr.QuantSpec(bits=3, grid_init='mse'), iters=60,
                        batch_size=16, progress=False, **kw)


def codes(result, apply_fn=None, params=None, calib=None):
  out = {name: np.asarray(qt.codes) for name, qt in result.qtensors.items()} | {
      'loss:' + r['unit']: np.float64(r['loss_final']) for r in result.report}
  if apply_fn is not None:
    err = np.mean((np.asarray(apply_fn(result.params, calib)) - np.asarray(apply_fn(params, calib))) ** 2)
    out['output_mse'] = np.float64(err)
  return out


if mode == 'devices':
  out = {}
  for name, make, blocks in [('mlp', tiny_models.mlp, r'block_\d+'), ('cnn', tiny_models.cnn, r'ResBlock_\d+')]:
    params, apply_fn, calib = make()
    for n in (1, 8):
      r = fr.quantize(params, apply_fn, calib, config(blocks=blocks, num_devices=n))
      out.update({f'{name}/{n}/{k}': v for k, v in codes(r, apply_fn, params, calib).items()})
  np.savez(sys.argv[2], **out)

elif mode == 'model':
  out = {}
  for name, make, blocks in [('mlp', tiny_models.mlp, r'block_\d+'), ('cnn', tiny_models.cnn, r'ResBlock_\d+')]:
    params, apply_fn, calib = make()
    for tag, kw in (('1', {'num_devices': 1}), ('2x4', {'num_devices': 8, 'model_devices': 4})):
      r = fr.quantize(params, apply_fn, calib, config(blocks=blocks, **kw))
      out.update({f'{name}/{tag}/{k}': v for k, v in codes(r, apply_fn, params, calib).items()})
      out.update({f'{name}/{tag}/bytes:{u["unit"]}': np.int64(u['state_bytes_per_device']) for u in r.report})
  np.savez(sys.argv[2], **out)

elif mode == 'sharded':
  # Params placed by the user over all 8 devices (kernels split along the output axis): the engine reduces its
  # checks where the arrays live and gives the quantized kernels (and their codes) back with the same sharding.
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402
  mesh = Mesh(np.array(jax.devices()), ('model',))
  out = {}
  params, apply_fn, calib = tiny_models.mlp()
  split = lambda x: NamedSharding(mesh, P(*([None] * (x.ndim - 1) + ['model'])) if x.ndim >= 2 and
                                  x.shape[-1] % 8 == 0 else P())
  sharded = jax.tree.map(lambda x: jax.device_put(x, split(x)), params)
  for tag, p in (('plain', params), ('sharded', sharded)):
    r = fr.quantize(p, apply_fn, calib, config(blocks=r'block_\d+', num_devices=8, model_devices=4))
    out.update({f'{tag}/{k}': v for k, v in codes(r).items()})
  kept = jax.tree.map(lambda a, b: a.sharding == b.sharding, sharded, r.params)
  out['kept_sharding'] = np.array(jax.tree.leaves(kept))
  big = r.params['block_0']['Dense_0']['kernel']   # (64, 32): each device holds 32 / 8 output columns
  out['shard_shapes'] = np.array([s.data.shape for s in big.addressable_shards] + [big.shape])
  out['codes_sharded'] = np.array([r.qtensors[k].codes.sharding == sharded_leaf.sharding for k, sharded_leaf in
                                   (('block_0/Dense_0/kernel', sharded['block_0']['Dense_0']['kernel']),)])
  np.savez(sys.argv[2], **out)

elif mode == 'process':
  pid, nproc, port, path = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
  if nproc > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=nproc, process_id=pid)
  params, apply_fn, calib = tiny_models.mlp()
  shard = np.asarray(calib).reshape(nproc, -1, calib.shape[-1])[pid]    # contiguous shard of this process
  r = fr.quantize(params, apply_fn, shard, config(blocks=r'block_\d+', num_devices=2, sample_shards=2))
  if pid == 0:
    np.savez(path, **codes(r, apply_fn, params, calib))
  if nproc > 1:
    jax.distributed.shutdown()

elif mode == 'resume':
  ckpt, path = sys.argv[2], sys.argv[3]
  params, apply_fn, calib = tiny_models.cnn()
  cfg = config(blocks=r'ResBlock_\d+', checkpoint_dir=ckpt, num_devices=2)
  cfg = fr.QuantConfig(**{**cfg.__dict__, 'iters': 400})
  r = fr.quantize(params, apply_fn, calib, cfg)
  np.savez(path, **codes(r))
