import sys

from qemu_unit.cli import main

sys.exit(main())
