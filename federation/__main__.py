"""``python -m federation ...`` is ``isthmus federation ...`` (used by tests and process supervisors)."""

from .cli import load_command

if __name__ == "__main__":
    load_command("federation").main(prog_name="python -m federation")
