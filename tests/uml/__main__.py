import sys

from tests.uml.run import main

sys.exit(main())
