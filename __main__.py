"""`python <this folder> train --checkpoint ... --dataset ...`: see headless/cli.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from headless.cli import main  # noqa: E402

sys.exit(main())
