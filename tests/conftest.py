"""Test setup: 8 fake CPU devices so sharding tests run for real on one host; `tests/helpers.py` importable."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import helpers` from any test directory
