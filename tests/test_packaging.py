"""The wheel installs everything under one `mxroll` namespace and runs from a directory that holds a
user's own `model.py` and `configs/` package, in a fresh virtualenv without the editable checkout."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "mxroll", "configs", "model", "precision", "rollout", "sync")
NETWORK_ERRORS = ("Could not find a version that satisfies", "No matching distribution found",
                  "Failed to establish a new connection", "Temporary failure in name resolution",
                  "Network is unreachable", "Name or service not known", "ProxyError", "ConnectTimeout",
                  "Read timed out", "Connection refused")

USER_CODE = """
import json, sys
import mxroll
from mxroll import Engine
e = Engine(model_path="preset:tiny", device="cpu", cache_dir=sys.argv[1], progress=False)
out = e.generate(input_ids=[0, 5, 6], sampling_params={"max_new_tokens": 3, "temperature": 0})
import mxroll.configs, mxroll.model
print(json.dumps({"mxroll": mxroll.__file__, "configs": mxroll.configs.__file__, "model": mxroll.model.__file__,
                  "output_ids": out["output_ids"], "user_modules": [m for m in ("model", "configs")
                                                                   if m in sys.modules]}))
"""


def build_wheel(tmp: Path) -> Path:
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout, and a stale
    # build/ could put files into the wheel that the sources no longer have.
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    dist = tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                           "-q", "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        log = proc.stdout + proc.stderr
        offline = [line.strip() for line in log.splitlines() if any(e in line for e in NETWORK_ERRORS)]
        if offline:
            pytest.skip(f"building the wheel needs the package registry (build isolation), unreachable here: "
                        f"{offline[0]}")
        pytest.fail(f"pip wheel failed:\n{log}")
    (wheel,) = dist.glob("mxroll-*.whl")
    return wheel


def fresh_venv(tmp: Path) -> tuple[Path, Path]:
    """A venv without pip and without the editable mxroll: a .pth line puts the running interpreter's
    site-packages (torch, safetensors, omegaconf, tqdm, numpy) on sys.path, but .pth files there (the
    editable finder's) are not processed."""
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    host = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")] or site.getsitepackages()
    (Path(purelib) / "host_packages.pth").write_text("\n".join(dict.fromkeys(host)) + "\n")
    return python, Path(purelib)


def test_wheel_runs_beside_a_users_model_py(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {n.split("/")[0] for n in names} == {"mxroll", dist_info}  # nothing at the top level but mxroll
    assert "mxroll/configs/models/tiny.json" in names and "mxroll/rollout/engine.py" in names
    assert "mxroll/configs/prompts/arithmetic.jsonl" in names

    python, purelib = fresh_venv(tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q",
                    "--target", str(purelib), str(wheel)], check=True, timeout=600)

    user = tmp_path / "project"
    (user / "configs").mkdir(parents=True)
    (user / "model.py").write_text("raise RuntimeError('user model imported')\n")
    (user / "configs" / "__init__.py").write_text("raise RuntimeError('user configs imported')\n")
    (user / "run.py").write_text(textwrap.dedent(USER_CODE))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([str(python), "run.py", str(tmp_path / "cache")], cwd=user, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("mxroll", "configs", "model"):
        assert Path(result[key]).is_relative_to(purelib / "mxroll"), (key, result[key])
    assert result["user_modules"] == []
    assert len(result["output_ids"]) == 3


def test_every_package_folder_is_listed_for_the_wheel():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"mxroll." + ".".join(p.parent.relative_to(root).parts)
             for top in ("configs", "model", "precision", "rollout", "sync") for p in (root / top).rglob("__init__.py")}
    assert found <= listed, f"missing from pyproject packages: {sorted(found - listed)}"
