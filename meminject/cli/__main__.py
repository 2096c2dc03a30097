"""``python -m meminject.cli``: the same entry point as the ``meminject`` command."""

from meminject.cli import main

if __name__ == "__main__":
    main()
