"""``python -m hybrid_jax``: the main job (see ``hybrid_jax._cli`` and ``hybrid_jax._job``)."""

import sys

try:
    from ._cli import main

    sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C before the job installed its handler
    print("python3 -m hybrid_jax: interrupted before training started", file=sys.stderr)
    sys.exit(130)
