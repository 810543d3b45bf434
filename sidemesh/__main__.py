import sys

from sidemesh.cli import main

sys.exit(main())
