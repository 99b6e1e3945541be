import sys

from csi_virtvol.cli import main

sys.exit(main())
