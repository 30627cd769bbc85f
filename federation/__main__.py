"""``python -m federation ...`` is ``isthmus federation ...`` (used by tests and process supervisors)."""

import sys

from .cli import main

if __name__ == "__main__":
    main(["federation", *sys.argv[1:]])
