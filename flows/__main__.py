"""``python -m flows``: the same as the ``flows`` command."""

from flows.training.cli import main

raise SystemExit(main())
