import sys

from vlpl.cli import main

sys.exit(main())
