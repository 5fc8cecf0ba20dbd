"""``python -m fastxc.train``: the training command (see ``fastxc.cli``)."""
import sys

from fastxc.cli import train_main

sys.exit(train_main())
