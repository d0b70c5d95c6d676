import sys

from omni_serve.cli import main

sys.exit(main())
