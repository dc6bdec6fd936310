"""`edgelm install-service`: run this installation of edgelm as a systemd service.

Writes the unit (`/etc/systemd/system/edgelm.service`, its `ExecStart` pointed at the
`edgelm` of this installation, e.g. a venv made with `pip install edgelm`) and, when
there is none yet, the configuration (`/etc/edgelm/edgelm.yaml`, from the commented
example); an existing configuration is kept. The service's user and its state and cache
directories (`/var/lib/edgelm` with the models, `/var/cache/edgelm` with the compiled
CUDA kernels) are made by systemd when the unit starts (`DynamicUser=`, `StateDirectory=`,
`CacheDirectory=`), so nothing else is created by hand. Then `systemctl daemon-reload`
and `systemctl enable --now edgelm`, unless `--no-enable` or `--root` (a directory
tree being prepared, as `systemctl --root` takes it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from edgelm import EdgelmError

UNIT = "etc/systemd/system/edgelm.service"
CONFIG = "etc/edgelm/edgelm.yaml"
_EXEC_PLACEHOLDER = "/opt/edgelm/.venv/bin/edgelm"


def packaged(name: str) -> str:
    """A file shipped in the package: `edgelm.service` or `edgelm.yaml`."""
    return resources.files("edgelm").joinpath("systemd", name).read_text()


def this_edgelm() -> str:
    """The `edgelm` command of the running installation (its venv's bin/)."""
    beside = Path(sys.executable).parent / "edgelm"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("edgelm")
    if found:
        return str(Path(found).absolute())
    raise EdgelmError("cannot find the `edgelm` command of this installation: pass --exec /path/to/edgelm")


def render_unit(exe: str) -> str:
    unit = packaged("edgelm.service")
    if _EXEC_PLACEHOLDER not in unit:
        raise EdgelmError("the packaged unit has no ExecStart to fill in")
    unit = unit.replace(_EXEC_PLACEHOLDER, exe)
    return unit.replace("Documentation=file:///opt/edgelm/README.md", "Documentation=https://pypi.org/project/edgelm/")


def install(root: Path = Path("/"), exe: str | None = None, enable: bool = True) -> list[str]:
    """Install the unit and the configuration under `root`; returns what was done, a
    line each. Raises EdgelmError with what to do when it cannot."""
    exe = exe or this_edgelm()
    if not Path(exe).is_file():
        raise EdgelmError(f"{exe} does not exist: pass the path of the edgelm command with --exec")
    done: list[str] = []
    unit_path, config_path = root / UNIT, root / CONFIG
    try:
        unit_path.parent.mkdir(parents=True, exist_ok=True)
        unit = render_unit(exe)
        old = unit_path.read_text() if unit_path.exists() else None
        if old != unit:
            tmp = unit_path.with_suffix(".service.tmp")
            tmp.write_text(unit)
            tmp.chmod(0o644)
            tmp.replace(unit_path)
            done.append(f"{'updated' if old is not None else 'wrote'} {unit_path} (ExecStart={exe} serve)")
        else:
            done.append(f"{unit_path} is up to date")
        config_path.parent.mkdir(parents=True, exist_ok=True)
        if config_path.exists():
            done.append(f"kept {config_path}")
        else:
            config_path.write_text(packaged("edgelm.yaml"))
            config_path.chmod(0o644)
            done.append(f"wrote {config_path} (edit it: model, host, keys; then `systemctl restart edgelm`)")
    except PermissionError as e:
        raise EdgelmError(f"cannot write {e.filename}: run `sudo {exe} install-service`") from None
    if not enable or root != Path("/"):
        done.append("to start it: sudo systemctl daemon-reload && sudo systemctl enable --now edgelm")
        return done
    if shutil.which("systemctl") is None:
        raise EdgelmError("systemctl is not here: this system does not run systemd (the files are written)")
    for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "edgelm"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise EdgelmError(f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()}")
        done.append(" ".join(cmd))
    done.append("running: `systemctl status edgelm`, logs: `journalctl -u edgelm -f`")
    return done
