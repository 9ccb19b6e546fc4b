import sys

from bft.cli import console_main

sys.exit(console_main())
