"""``python -m federation.cli ...`` is ``isthmus ...`` (used by tests and process supervisors)."""

from . import main

if __name__ == "__main__":
    main()
