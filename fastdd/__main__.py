import sys

import fastdd

if getattr(fastdd, "__file__", None) is None:  # a namespace package: a folder named fastdd here shadows the package
    shadow = next(iter(fastdd.__path__), "fastdd")
    print(
        f"fastdd: the folder {shadow} in the current directory shadows the installed fastdd package; run "
        "`python -m fastdd` from another directory, or the `fastdd` command",
        file=sys.stderr,
    )
    sys.exit(2)

from fastdd.cli.main import main  # noqa: E402

sys.exit(main())
