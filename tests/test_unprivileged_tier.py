"""The unprivileged tier (tests marked ``unprivileged``: parsers, policy, cookie,
limits, views, deploy renderings...) really passes without root: here it runs
as user nobody, every test of it, none skipped. So a test that comes to need
root, or a fixture that does, cannot hide in the tier."""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
from xml.etree import ElementTree

from support.as_nobody import CHECKOUT, NOBODY, run_as_nobody


def test_the_unprivileged_tier_passes_as_nobody():
    work = pathlib.Path(tempfile.mkdtemp(prefix="vmctl-nobody-"))
    try:
        os.chown(work, NOBODY, NOBODY)
        report = work / "report.xml"
        run = run_as_nobody(
            [
                sys.executable, "-m", "pytest", "-m", "unprivileged", "-q", "-p", "no:cacheprovider",
                f"--basetemp={work / 'tmp'}", f"--junitxml={report}", str(CHECKOUT / "tests"),
            ],
            work,
            timeout=540,
        )  # fmt: skip
        assert run.returncode == 0, f"{run.stdout[-8000:]}\n{run.stderr[-4000:]}"
        assert report.stat().st_uid == NOBODY  # written by the tier's own run, as nobody
        suite = ElementTree.parse(report).getroot().find("testsuite")
        assert suite is not None
        counts = {key: int(suite.get(key, "0")) for key in ("tests", "skipped", "failures", "errors")}
        assert counts["tests"] > 0 and counts["skipped"] == counts["failures"] == counts["errors"] == 0, counts
    finally:
        shutil.rmtree(work, ignore_errors=True)
