"""`python -m epp_model_server` runs the server (same as `epp-model-server`)."""

import sys

from .cli import main

sys.exit(main())
