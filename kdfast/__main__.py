"""``python -m kdfast <command>``: see ``kdfast --help``."""
import sys

from kdfast.cli.main import main

sys.exit(main())
