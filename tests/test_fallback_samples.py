"""QuantConfig.fallback_samples: the RTN reference loss and the fall-back compare on a fixed, seeded, recorded subset
of the samples; the loss on every sample comes from the pass that makes the next unit's inputs."""

import dataclasses

import numpy as np
import pytest

import flexround_jax as fr

import tiny_models


def _config(**kw):
  kw = {'iters': 30, **kw}
  return fr.QuantConfig(method=fr.methods.flexround(lr=kw.pop('lr', 5e-3)), weight=fr.QuantSpec(bits=3),
                        blocks=r'block_\d+', batch_size=16, progress=False, **kw)


@pytest.fixture(scope='module')
def mlp():
  return tiny_models.mlp()


def test_a_subset_changes_nothing_but_the_reference_losses_when_no_unit_falls_back(mlp):
  params, apply_fn, calib = mlp
  full = fr.quantize(params, apply_fn, calib, _config())
  sub = fr.quantize(params, apply_fn, calib, _config(fallback_samples=16))
  subsets = {tuple(r['fallback_subset']) for r in sub.report}
  assert len(subsets) == 1   # one fixed subset for every unit
  subset = subsets.pop()
  assert len(subset) == 16 and list(subset) == sorted(set(subset)) and max(subset) < len(calib)
  for a, b in zip(full.report, sub.report):
    assert not a['fell_back_to_rtn'] and not b['fell_back_to_rtn']
    assert b['loss_final'] == pytest.approx(a['loss_final'], rel=1e-6)   # every sample, the same pass
    assert b['loss_rtn'] != a['loss_rtn']   # on the subset
    assert b['loss_final_subset'] <= b['loss_rtn'] and b['loss_final_subset'] == b['loss_trained_subset']
    assert 'fallback_subset' not in a and 'loss_final_subset' not in a   # the default reports as before
  for name, qt in full.qtensors.items():
    np.testing.assert_array_equal(np.asarray(sub.qtensors[name].codes), np.asarray(qt.codes))
  other = fr.quantize(params, apply_fn, calib, _config(fallback_samples=16, seed=1, iters=0))
  assert all('fallback_subset' not in r for r in other.report)   # nothing trains: RTN measured on every sample


def test_a_unit_that_falls_back_on_the_subset_reports_and_passes_on_its_kept_kernels(mlp):
  params, apply_fn, calib = mlp
  with pytest.warns(UserWarning, match='keeping RTN'):
    sub = fr.quantize(params, apply_fn, calib, _config(lr=5.0, fallback_samples=16))
  rtn = fr.quantize(params, apply_fn, calib, _config(iters=0))
  bad = [i for i, r in enumerate(sub.report) if r['fell_back_to_rtn']]
  assert bad
  i = bad[0]   # the first unit that fell back has the same inputs in both runs: its RTN loss on every sample
  assert sub.report[i]['loss_final'] == pytest.approx(rtn.report[i]['loss_final'], rel=1e-6)
  assert sub.report[i]['loss_final_subset'] == sub.report[i]['loss_rtn']
  assert not sub.report[i]['loss_trained_subset'] <= sub.report[i]['loss_rtn']   # worse, or NaN
  unit_kernels = [n for n in sub.qtensors if n.startswith(sub.report[i]['unit'] + '/')]
  for name in unit_kernels:
    np.testing.assert_array_equal(np.asarray(sub.qtensors[name].codes), np.asarray(rtn.qtensors[name].codes))


def test_fallback_samples_is_validated():
  for bad in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match='QuantConfig.fallback_samples'):
      dataclasses.replace(_config(), fallback_samples=bad)
