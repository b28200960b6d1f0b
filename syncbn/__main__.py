"""``python -m syncbn``: the diagnostic report of :mod:`syncbn.diagnose`."""

from .diagnose import main

if __name__ == "__main__":
    raise SystemExit(main())
