import sys

from fastdd.cli.main import main

sys.exit(main())
