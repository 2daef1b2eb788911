import sys

from datacomp_assets.evaluation.cli import main

sys.exit(main())
