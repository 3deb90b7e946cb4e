"""``python -m fastconv ...``: the ``fastconv`` command without the console script (e.g. from a source tree)."""
import sys

from fastconv_cli import main

sys.exit(main())
