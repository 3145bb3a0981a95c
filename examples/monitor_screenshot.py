"""Screenshot of the live monitor page during a demo run (how docs/img/monitor.png was made).

    .venv/bin/python examples/monitor_screenshot.py docs/img/monitor.png

Runs ``peaknet-pva demo --monitor-port 0 --linger 30`` (loopback), waits for its streaming to end,
then loads the page in Debian's headless Chromium (Selenium + chromium-driver) and saves a PNG.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from peaknet_pva.loopback import loopback_env

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1150"]


def main(out: str) -> int:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    log = Path(out).with_suffix(".demo.log")
    with open(log, "w") as fh:
        demo = subprocess.Popen([sys.executable, "-m", "peaknet_pva.cli", "demo", "--duration", "30",
                                 "--monitor-port", "0", "--linger", "30", "--out", "out/demo"],
                                stdout=fh, stderr=subprocess.STDOUT, env=loopback_env())
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and demo.poll() is None:
            text = log.read_text()
            m = re.search(r"keeping the monitor page up for \S+ s: (http://\S+/)", text)
            if m:
                break
            time.sleep(1)
        else:
            raise SystemExit(f"demo ended or timed out before the page was ready; see {log}")
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for flag in FLAGS:
            opts.add_argument(flag)
        drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        try:
            drv.get(m.group(1))
            time.sleep(6)  # a few live updates
            drv.save_screenshot(out)
        finally:
            drv.quit()
        return demo.wait(timeout=300)
    finally:
        if demo.poll() is None:
            demo.send_signal(2)
            demo.wait(timeout=120)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "monitor.png"))
