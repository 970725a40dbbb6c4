"""``python -m flashpack_ops``: the ``flashpack`` command."""

import sys

from .cli import main

sys.exit(main())
