import sys

from bo_search.sensitivity.cli import main

sys.exit(main())
