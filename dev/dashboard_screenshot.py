"""Save a screenshot of a running dashboard (docs/dashboard.png): `python dev/dashboard_screenshot.py URL OUT`."""

from __future__ import annotations

import sys
import time

from tests.test_dashboard import chromium

url, out = sys.argv[1], sys.argv[2]
browser = chromium()
try:
    browser.get(url)
    time.sleep(20)  # ten refreshes, so the charts have a line to draw
    browser.save_screenshot(out)
finally:
    browser.quit()
