"""Test-wide settings.

Under CI (CI=true, as .ci/run runs), hypothesis draws the same examples on
every run, so a submission's result does not depend on the seed of the day;
locally each run explores new examples.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
