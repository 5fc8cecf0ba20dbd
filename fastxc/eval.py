"""``python -m fastxc.eval``: the spliced-in evaluation CLI (see ``fastxc.evaluate``)."""
import sys

from fastxc.evaluate import evaluate, main, spliced_loss, store_metrics  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
