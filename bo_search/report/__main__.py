import sys

from bo_search.report.cli import main

sys.exit(main())
