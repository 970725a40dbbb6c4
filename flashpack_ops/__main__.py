"""``python -m flashpack_ops``: the ``flashpack`` command.

``main`` is importable from here, as the reference package's ``flashpack.__main__.main``
(its console script's entry point); importing this module runs nothing.
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
