import os

import pytest
from hypothesis import HealthCheck, settings

# too_slow: generating a case compiles a jax.random call per shape, slow on a busy 2-core machine; not a test failure.
settings.register_profile('ci', deadline=None, max_examples=25, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
  """Tests never touch the network: any socket connect to a non-loopback address fails loudly."""
  import socket
  real_connect = socket.socket.connect

  def guarded(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not (host.startswith('127.') or host in ('localhost', '::1') or host.startswith('/')):
      raise RuntimeError(f'test tried to reach the network: {address}')
    return real_connect(self, address)

  monkeypatch.setattr(socket.socket, 'connect', guarded)
