"""``python -m deepseek_vl2``: the command line (see ``deepseek_vl2/cli.py``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
