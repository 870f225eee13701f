"""``python -m hybrid_jax``: see ``hybrid_jax._cli``."""

import sys

from ._cli import main

sys.exit(main())
