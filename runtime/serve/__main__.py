"""``python -m runtime.serve ARTIFACT [...]``: see `runtime.serve.cli`."""

from runtime.serve.cli import main

raise SystemExit(main())
