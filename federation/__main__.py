"""``python -m federation ...`` is ``isthmus federation ...`` (used by tests and process supervisors)."""

from .cli._federation import federation

if __name__ == "__main__":
    federation.main(prog_name="python -m federation")
