"""`python -m mesh_node`: the same as the `mesh-node` command."""

import sys

from .cli import main

sys.exit(main())
