import sys

from hshelper.cli import main

sys.exit(main())
