"""``python -m flows``: the same as the ``flows`` command."""

from flows.cli import main

raise SystemExit(main())
