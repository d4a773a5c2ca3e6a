"""``python -m engine`` is the same as the ``locore`` console script."""

from engine.cli import main

raise SystemExit(main())
