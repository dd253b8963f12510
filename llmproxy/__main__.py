import sys

from llmproxy.cli import main

sys.exit(main())
