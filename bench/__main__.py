import sys

from clcompose.bench.cli import main

sys.exit(main())
