"""The monitor page in a real headless Chromium (Debian chromium + chromium-driver, Selenium)
against the real pipeline on loopback: replay -> PeakNet consumer -> monitor server -> browser.
Checks the page is live (>= 2 updates/s), its counters equal the status channel's, and the latest
hit shows one circle per published peak; keeps a screenshot (tmp dir and out/monitor-test.png)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from pva_helpers import (PEAKNET_CLASS, PEAKNET_CPU_ARGS, START_TIMEOUT_S, ReadyGate, consumer_set, tiny_dataset,
                         unique_tag, wait_until)

from peaknet_pva.monitor import read_snapshot  # noqa: E402
from peaknet_pva.pva import procs  # noqa: E402

pytestmark = [pytest.mark.pva, pytest.mark.timeout(400)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1600"]


def _driver(tmp_path: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Debian chromium / chromium-driver not installed (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'chrome-profile'}"]:
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(30)
    drv.set_script_timeout(30)
    return drv


def _text(drv, selector: str) -> str:
    """textContent of one element, read atomically (the page rebuilds its rows on every update)."""
    return str(drv.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : '';",
                                  selector))


def _hit(drv) -> tuple[str, int, str]:
    """(uniqueId, circles drawn, 'peaks' text) of the latest hit, in one consistent read."""
    uid, n, text = drv.execute_script(
        "const s = document.getElementById('hit-svg'); const t = document.getElementById('hit-npeaks');"
        "return [s ? (s.getAttribute('data-unique-id') || '') : '', s ? s.querySelectorAll('circle.peak').length : 0,"
        " t ? t.textContent.trim() : ''];")
    return uid, int(n), text


def _output_connected(url: str, channel: str) -> bool:
    snap = read_snapshot(url)
    return any(c["channel"] == channel and c.get("outputConnected") for c in snap.get("consumers", []))


def test_monitor_page_in_chromium(tmp_path: Path) -> None:
    drv = _driver(tmp_path)
    n_frames = 40
    tag = unique_tag("mon")
    data_dir = tiny_dataset(tmp_path / "data", n_frames=n_frames, seed=5)
    args = dict(PEAKNET_CPU_ARGS, weights="default")
    args.pop("model")
    mon, url = procs.start_monitor(f"{tag}:pk:*:output", status=f"{tag}:pk:*:status", n_consumers=2, port=0,
                                   min_peaks=1, runtime_s=300, log_path=tmp_path / "monitor.log")
    gate = ReadyGate(f"{tag}:ready")  # opened once the monitor has the output channel
    replay = procs.start_replay(data_dir, f"{tag}:image", fps=20, wait_for=[gate.name], wait_connected=[f"{tag}:pk:1:status"],
                                extra=["--wait-timeout", str(2 * START_TIMEOUT_S), "--report-period", "0"],
                                log_path=tmp_path / "replay.log")
    try:
        with consumer_set(PEAKNET_CLASS, f"{tag}:image", tag, tmp_path, role="pk", n_consumers=1, processor_args=args) as pk:
            with procs.OutputMonitor(pk.output_channels) as out:
                out.wait_connected(30)
                # pvAccess searches back off: hold the stream until the monitor has the output channel.
                wait_until(lambda: _output_connected(url, f"{tag}:pk:1:output"), 60, what="monitor on the output channel")
                gate.open()
                assert replay.popen.wait(120) == 0, replay.log_text()
                assert not out.wait_for(range(1, n_frames + 1), timeout_s=120)
                published = out.snapshot()
                time.sleep(2.5)  # a status update after the last frame
                status = procs.read_status(pk.status_channels[0])
                drv.get(url)
                t0 = time.monotonic()
                wait_until(lambda: drv.execute_script("return window.monitorUpdates") >= 1, 20, what="first page update")
                row = f"tr[data-channel='{tag}:pk:1:output']"

                def counter(name: str) -> str:
                    return _text(drv, f"{row} td[data-counter='{name}']")

                wait_until(lambda: counter("processed") == str(status["userStats"]["nProcessed"]), 20,
                           what="page counters = status channel")
                user = status["userStats"]
                assert user["nProcessed"] == n_frames
                assert counter("dropped") == str(user["nDropped"]) and counter("bad") == str(user["nBadFrames"])
                assert counter("missedIds") == str(user["nMissedIds"]) and counter("hits") == str(user["nHits"])
                frames = _text(drv, f"{row} td[data-field='frames']")
                assert int(frames) == n_frames, frames  # every published frame seen, once
                # live: count pushes over 3 s
                u0 = drv.execute_script("return window.monitorUpdates")
                time.sleep(3.0)
                rate = (drv.execute_script("return window.monitorUpdates") - u0) / 3.0
                assert rate >= 2.0, rate
                # the latest hit: one circle per peak published with that uniqueId
                wait_until(lambda: _hit(drv)[0], 20, what="a hit image")
                uid, n_circles, n_text = _hit(drv)  # read in one script: the page redraws 4x a second
                uid = int(uid)
                expected = published[uid][0][1].n
                assert expected > 0 and n_circles == expected == int(n_text)
                assert drv.execute_script("return document.getElementById('hit-img').naturalWidth") > 0
                shot = tmp_path / "monitor.png"
                drv.save_screenshot(str(shot))
                assert shot.read_bytes()[:4] == b"\x89PNG"
                Path("out").mkdir(exist_ok=True)
                shutil.copy(shot, Path("out") / "monitor-test.png")
                print(f"page updates/s {rate:.1f}; screenshot {shot}; checks took {time.monotonic() - t0:.1f} s")
    finally:
        drv.quit()
        replay.stop(10)
        mon.stop(15)
        gate.close()
    assert "Traceback" not in mon.log_text(), mon.log_text()[-3000:]
