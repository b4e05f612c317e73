"""Export a quantized model (``QuantizeResult.params`` and ``.qtensors``) for the runtimes that serve it.

Every name here is ``fr.export.NAME``; the modules are where each format is written (and documented):
  native              our own format, packed codes + grids, verified on load: ``save_safetensors`` /
                      ``load_safetensors``, ``save_orbax`` / ``load_orbax`` (``Loaded``), ``load_activations``
  gguf                llama.cpp GGUF, Q4_0 / Q8_0 blocks written into the source file: ``save_gguf``
  qwix                the prequantized params of a qwix PTQ model: ``qwix_rules``, ``to_qwix_params``, ``ptq_model``
  compressed_tensors  an HF checkpoint folder in compressed-tensors' 'pack-quantized' format (vLLM, transformers):
                      ``save_compressed_tensors``; unquantized (a decoder from a GGUF, fake-quant weights):
                      ``save_hf``
  grid                the grid rules several formats share (scales exact in a dtype, groups that divide the inputs)

Importing this package imports none of the optional packages (gguf, qwix, torch): each exporter imports what it
needs when called (``flexround_jax._extras``).
"""

from flexround_jax.export.compressed_tensors import save_compressed_tensors
from flexround_jax.export.compressed_tensors import save_hf
from flexround_jax.export.gguf import save_gguf
from flexround_jax.export.native import FORMAT
from flexround_jax.export.native import FORMAT_1
from flexround_jax.export.native import Loaded
from flexround_jax.export.native import load_activations
from flexround_jax.export.native import load_orbax
from flexround_jax.export.native import load_safetensors
from flexround_jax.export.native import save_orbax
from flexround_jax.export.native import save_safetensors
from flexround_jax.export.qwix import ptq_model
from flexround_jax.export.qwix import qwix_rules
from flexround_jax.export.qwix import to_qwix_params

__all__ = ['FORMAT', 'FORMAT_1', 'Loaded', 'load_activations', 'load_orbax', 'load_safetensors', 'ptq_model',
           'qwix_rules', 'save_compressed_tensors', 'save_gguf', 'save_hf', 'save_orbax', 'save_safetensors',
           'to_qwix_params']
