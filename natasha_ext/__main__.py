"""``python -m natasha_ext``: diagnosis and self-test (see natasha_ext.selftest.cli)."""
import sys

from natasha_ext.selftest.cli import main

sys.exit(main())
