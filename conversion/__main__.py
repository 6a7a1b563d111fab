"""`python -m conversion SRC DST`: the same command as `python -m fluxjax.conversion SRC DST`."""

import sys

from fluxjax.conversion.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
