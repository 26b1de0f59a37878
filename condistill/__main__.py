"""``python -m condistill`` is the ``condistill`` command."""
import sys

from condistill.cli import main

sys.exit(main())
