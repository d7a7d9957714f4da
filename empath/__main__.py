import sys

from empath.cli import main

sys.exit(main())
