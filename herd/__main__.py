"""`python -m herd ...` runs the `herd` command (also for `torchrun -m herd pretrain ...`)."""

import sys

from herd.cli import main

sys.exit(main())
