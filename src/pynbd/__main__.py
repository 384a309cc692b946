"""``python -m pynbd`` is the ``pynbd`` command."""

import sys

from .cli import main

sys.exit(main())
