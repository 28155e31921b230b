"""``python -m unseg``: the ``unseg`` command (for an environment whose scripts are not on PATH)."""

import sys

from unseg.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
