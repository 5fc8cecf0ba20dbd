"""``python -m fastxc <command>``: the same as the ``fastxc`` console script."""
import sys

from fastxc.cli import main

sys.exit(main())
