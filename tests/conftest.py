"""Session-wide test set-up.

SIGTERM becomes KeyboardInterrupt. The deployment and Flower tests start SuperLinks, SuperNodes
and runs in their own process groups and stop them in `finally` blocks and fixture teardowns.
Python's default SIGTERM action ends pytest at once, skipping both, so a harness that stops the
suite with SIGTERM (`timeout`, a CI runner's cancel) would leave those processes running. As a
KeyboardInterrupt, pytest stops the test, runs the teardowns and exits (status 2).
"""

import signal


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"pytest got signal {signum}: stopping, after the tests' clean-up")


signal.signal(signal.SIGTERM, _interrupt)
