import sys

from neoxja.cli import main

sys.exit(main())
