"""The pytest command the mutation scripts run a test selection with (hand.py, recheck.py): in one process
(`-n0`: the suite's xdist workers would only add their start-up to a one-file selection), quiet, writing no
cache into the checkout. The cosmic-ray configs (*.toml) spell the same flags in their test-command."""

import sys

PYTEST = (sys.executable, "-m", "pytest", "-n0", "-q", "-p", "no:cacheprovider")
