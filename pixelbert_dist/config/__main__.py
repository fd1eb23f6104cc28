"""`python -m pixelbert_dist.config [CONFIG.yaml] [--section.key=value ...]` and `--help`."""

import sys

from pixelbert_dist.config.help import main

sys.exit(main())
