"""``python -m cloudckpt``: the same command line as the ``cloudckpt`` console script."""

from cloudckpt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
