"""``python -m ditlab`` is the ``ditlab`` command."""

import sys

from ditlab.cli import main

sys.exit(main())
