"""`edgelm install-service`: the unit and configuration it writes for this installation,
checked by `systemd-analyze verify` and `systemd-analyze security`, in a directory tree
(`--root`, as `systemctl --root` takes one) since this machine's systemd is not PID 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EDGELM = str(Path(sys.executable).parent / "edgelm")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGELM, "install-service", *args], capture_output=True, text=True, timeout=120)


def test_writes_a_unit_for_this_installation_and_keeps_an_edited_config(tmp_path: Path) -> None:
    r = run("--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "etc/systemd/system/edgelm.service"
    config = tmp_path / "etc/edgelm/edgelm.yaml"
    text = unit.read_text()
    assert f"ExecStart={EDGELM} serve --config /etc/edgelm/edgelm.yaml" in text
    assert "DynamicUser=yes" in text and "StateDirectory=edgelm" in text and "CacheDirectory=edgelm" in text
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    assert "models_dir: /var/lib/edgelm/models" in config.read_text()
    assert "systemctl enable --now edgelm" in r.stdout  # with --root nothing is enabled: it says how
    # The unit verifies and keeps its hardening score as installed.
    v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert v.returncode == 0 and v.stderr.strip() == "", v.stderr
    s = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert float(s.stdout.split("Overall exposure level for edgelm.service:")[1].split()[0]) <= 2.0
    # Again, after the user edited the config: the config stays, the unit is current.
    config.write_text("model: my-model.gguf\nhost: 0.0.0.0\n")
    r = run("--root", str(tmp_path))
    assert r.returncode == 0 and f"kept {config}" in r.stdout and "is up to date" in r.stdout, r.stdout
    assert config.read_text() == "model: my-model.gguf\nhost: 0.0.0.0\n"


def test_clear_errors(tmp_path: Path) -> None:
    r = run("--root", str(tmp_path), "--exec", str(tmp_path / "nope"))
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
