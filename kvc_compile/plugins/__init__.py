"""Kernels behind the ``kvc::`` ops: ``triton/`` (GPU kernels, runnable on the CPU under
``TRITON_INTERPRET=1`` for testing). Every kernel has a pure-PyTorch reference it is tested against."""
