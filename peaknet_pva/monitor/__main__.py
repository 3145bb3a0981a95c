"""``python -m peaknet_pva.monitor ...`` = ``peaknet-pva monitor ...``."""

import sys

from ..cli import main

sys.exit(main(["monitor", *sys.argv[1:]]))
