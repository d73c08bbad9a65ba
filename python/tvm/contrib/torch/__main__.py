"""``python -m tvm.contrib.torch``: see :mod:`tvm.contrib.torch.cli`."""
import sys

from .cli import main

sys.exit(main())
