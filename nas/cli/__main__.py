"""``python -m nas.cli``: the ``mpnas`` command."""

from nas.cli.main import main

raise SystemExit(main())
