"""``python -m locore`` is the same as the ``locore`` console script."""

from locore.cli import main

raise SystemExit(main())
