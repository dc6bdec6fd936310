"""Log output: journald priority prefixes when stderr is the journal stream, JSON lines
with `log_format: json`, plain lines otherwise (edgelm/logs.py), in a real process whose
stderr is a file, as systemd hands the journal's stream to the service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAM = """
import logging, sys
from edgelm import logs
logs.setup("debug", sys.argv[1])
log = logging.getLogger("edgelm.test")
log.debug("d"); log.info("i"); log.warning("w"); log.error("e"); log.critical("c")
log.info("request", extra={"method": "POST", "status": 200, "tokens_in": 12})
try:
    1 / 0
except ZeroDivisionError:
    log.exception("failed")
"""


def run(tmp_path: Path, fmt: str, journal: bool) -> list[str]:
    err = tmp_path / f"stderr-{fmt}-{journal}"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with open(err, "w") as f:
        if journal:
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", PROGRAM, fmt], stderr=f, env=env, check=True, timeout=60)
    return err.read_text().splitlines()


def test_journal_stream_gets_priority_prefixes(tmp_path: Path) -> None:
    lines = run(tmp_path, "text", journal=True)
    assert lines[:6] == [
        "<7>edgelm.test: d",
        "<6>edgelm.test: i",
        "<4>edgelm.test: w",
        "<3>edgelm.test: e",
        "<2>edgelm.test: c",
        "<6>edgelm.test: request",
    ]
    # A traceback keeps the error priority on every line, so `journalctl -p err` shows it whole.
    tb = lines[6:]
    assert tb[0] == "<3>edgelm.test: failed" and len(tb) > 3 and all(line.startswith("<3>") for line in tb)
    assert "ZeroDivisionError" in tb[-1]


def test_plain_lines_when_stderr_is_not_the_journal(tmp_path: Path) -> None:
    lines = run(tmp_path, "text", journal=False)
    assert not any(line.startswith("<") for line in lines)
    assert " ERROR edgelm.test: e" in lines[3] and lines[3][:4].isdigit()  # time stamp first


def test_json_lines(tmp_path: Path) -> None:
    for journal in (False, True):  # JSON wins over the journal's prefixes: collectors parse it whole
        rows = [json.loads(line) for line in run(tmp_path, "json", journal)]
        assert [r["level"] for r in rows] == ["debug", "info", "warning", "error", "critical", "info", "error"]
        assert all(r["logger"] == "edgelm.test" and r["ts"].endswith("Z") for r in rows)
        assert {k: rows[5][k] for k in ("msg", "method", "status", "tokens_in")} == {
            "msg": "request",
            "method": "POST",
            "status": 200,
            "tokens_in": 12,
        }
        assert "ZeroDivisionError" in rows[6]["exc"]


def test_unknown_format_is_refused() -> None:
    from edgelm import logs

    with pytest.raises(ValueError, match="log_format must be one of text, json"):
        logs.setup("info", "xml")
