"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, as a local TFDS array_record data set.

The four IDX files (``/usr/share/datasets/fashion-mnist/*.gz``) are converted once by a TFDS builder
(``prepare()``, or ``python -m flexround_jax.data.fashion_mnist``, which ``make data`` runs); afterwards every
reader goes through ``tfds.data_source``, which needs neither TensorFlow nor the network, so ``load_arrays`` works
unchanged for any prepared TFDS data set with ``image``/``label`` features (e.g. a user's ``imagenet2012``).

Fixed split of the 60,000 training images (``split_indices``): one permutation
``np.random.default_rng(SPLIT_SEED).permutation(60000)``; its first 1,024 entries are the calibration images, the
next 5,000 the validation images (hyper-parameter choice), the remaining 53,976 the FP training images. The three
sets are disjoint; the 10,000 test images are never touched before the final evaluation.
"""

from __future__ import annotations

import functools
import gzip
import os

import numpy as np

from flexround_jax import _extras

NAME = 'fashion_mnist_local'
SOURCE_DIR = '/usr/share/datasets/fashion-mnist'
SOURCE_DIR_ENV = 'FLEXROUND_FASHION_MNIST_DIR'
FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
               'Ankle boot')
SPLIT_SEED = 0
N_CALIBRATION = 1024
N_VALIDATION = 5000


def read_idx(path: str) -> np.ndarray:
  """An IDX file (optionally gzipped) as a uint8 array of its stored shape."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    b = f.read()
  if b[0] != 0 or b[1] != 0 or b[2] != 0x08:
    raise ValueError(f'{path}: not an unsigned-byte IDX file (magic {b[:4].hex()})')
  ndim = b[3]
  shape = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
  return np.frombuffer(b, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as a gzipped IDX file (the inverse of ``read_idx``; used by tests)."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.tobytes())


def resolve_source_dir(source_dir: str | None = None) -> str:
  """``source_dir``, else ``$FLEXROUND_FASHION_MNIST_DIR``, else the Debian package's folder."""
  return source_dir or os.environ.get(SOURCE_DIR_ENV) or SOURCE_DIR


def check_source_dir(source_dir: str) -> None:
  """Raises FileNotFoundError naming the missing IDX files and how to install them."""
  missing = [f for pair in FILES.values() for f in pair if not os.path.exists(os.path.join(source_dir, f))]
  if missing:
    raise FileNotFoundError(
        f'Fashion-MNIST IDX files missing in {source_dir}: {", ".join(missing)}. Run `make data`, or '
        f'`apt-get install -y dataset-fashion-mnist` (as root), or point ${SOURCE_DIR_ENV} / source_dir= at a '
        'folder holding the four .gz files.')


def _tfds():
  return _extras.require('tensorflow_datasets', 'data', 'the Fashion-MNIST TFDS data set')


@functools.cache
def builder_class():
  """The TFDS builder ``FashionMnistLocal`` (registered as NAME), defined on first use: TFDS is the ``data`` extra.

  Defined once per process, so ``python -m`` (which runs this file as __main__ and imports it again) registers the
  name once.
  """
  tfds = _tfds()
  from etils import epath  # pylint: disable=g-import-not-at-top  (a TFDS dependency)

  class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST read from local IDX files; images (28, 28, 1) uint8, labels 0..9."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'From the Debian dataset-fashion-mnist IDX files.'}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
      # tfds derives this through importlib_resources, an undeclared dependency; the file itself is enough.
      return epath.Path(__file__)

    def __init__(self, *, source_dir: str | None = None, file_format='array_record', **kwargs):
      self._source_dir = resolve_source_dir(source_dir)
      super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
      return self.dataset_info_from_configs(
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
              'label': tfds.features.ClassLabel(names=CLASS_NAMES),
          }),
          supervised_keys=('image', 'label'),
          homepage='https://github.com/zalandoresearch/fashion-mnist',
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # Everything is local.
      check_source_dir(self._source_dir)
      return {split: self._generate_examples(*(os.path.join(self._source_dir, f) for f in files))
              for split, files in FILES.items()}

    def _generate_examples(self, images_path, labels_path):
      images, labels = read_idx(images_path), read_idx(labels_path)
      if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f'{images_path}: images {images.shape} do not match labels {labels.shape}')
      for i in range(images.shape[0]):
        yield i, {'image': images[i, :, :, None], 'label': int(labels[i])}

  return FashionMnistLocal


def __getattr__(name):
  if name == 'FashionMnistLocal':
    return builder_class()
  raise AttributeError(f'module {__name__} has no attribute {name!r}')


def prepare(data_dir: str | None = None, source_dir: str | None = None) -> str:
  """Converts the IDX files into a TFDS array_record data set (once); returns the data set's folder."""
  source_dir = resolve_source_dir(source_dir)
  builder = builder_class()(data_dir=data_dir, source_dir=source_dir)
  if not builder.is_prepared():
    check_source_dir(source_dir)
  builder.download_and_prepare(download_config=_tfds().download.DownloadConfig(try_download_gcs=False))
  return str(builder.data_path)


def load_arrays(split: str, name: str = NAME, data_dir: str | None = None,
                chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """All examples of a prepared TFDS split: (images (N, H, W, C) uint8, labels (N,) int32), in stored order."""
  if name == NAME:
    builder_class()   # registers NAME
  source = _tfds().data_source(name, data_dir=data_dir, split=split)
  images, labels = [], []
  for start in range(0, len(source), chunk):
    batch = source.__getitems__(list(range(start, min(start + chunk, len(source)))))
    images.append(np.stack([ex['image'] for ex in batch]))
    labels.append(np.asarray([ex['label'] for ex in batch], np.int32))
  return np.concatenate(images), np.concatenate(labels)


def split_indices(n: int = 60000, seed: int = SPLIT_SEED, n_calibration: int = N_CALIBRATION,
                  n_validation: int = N_VALIDATION) -> dict[str, np.ndarray]:
  """Disjoint index sets into the training split: {'calibration', 'validation', 'train'} (see module doc)."""
  if n_calibration + n_validation >= n:
    raise ValueError(f'n_calibration + n_validation = {n_calibration + n_validation} must be < n = {n}')
  perm = np.random.default_rng(seed).permutation(n)
  return {'calibration': perm[:n_calibration],
          'validation': perm[n_calibration:n_calibration + n_validation],
          'train': perm[n_calibration + n_validation:]}


def load_splits(data_dir: str | None = None, name: str = NAME) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train', 'validation', 'calibration', 'test'} -> (images uint8 NHWC, labels int32) with the fixed split."""
  x, y = load_arrays('train', name=name, data_dir=data_dir)
  out = {k: (x[idx], y[idx]) for k, idx in split_indices(len(x)).items()}
  out['test'] = load_arrays('test', name=name, data_dir=data_dir)
  return out


def main():
  path = prepare()
  n = {s: len(_tfds().data_source(NAME, split=s)) for s in FILES}
  print(f'Fashion-MNIST ready as TFDS data set {NAME!r} at {path} ({n["train"]} train, {n["test"]} test)')


if __name__ == '__main__':
  from flexround_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  fashion_mnist.main()
