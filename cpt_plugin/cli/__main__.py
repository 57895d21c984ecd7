"""`python -m cpt_plugin.cli`: the same as the `cpt-plugin` command."""

from cpt_plugin.cli import main

raise SystemExit(main())
