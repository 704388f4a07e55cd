"""python -m lavis_vpgtrans.chat: the terminal chat (see cli.py)."""

import sys

from lavis_vpgtrans.chat.cli import main

sys.exit(main())
