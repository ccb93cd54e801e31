"""Loaded at start-up by every Python process a test starts (conftest puts
this directory on their ``PYTHONPATH``): the test process's loopback-only
guard, in the child too."""

import os

if os.environ.get("FIRSTPARTY_TEST_OFFLINE") == "1":
    import firstparty_offline

    firstparty_offline.install()
