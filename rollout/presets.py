"""`preset:NAME` model paths: a seeded synthetic checkpoint of a built-in preset, written once."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .. import configs
from ..model.synthetic import make_checkpoint

log = logging.getLogger(__name__)
PREFIX = "preset:"


def resolve_model_path(model_path: str, seed: int, cache_dir: str | None, progress: bool = True,
                       config_only: bool = False) -> Path:
    """A checkpoint directory for `model_path`; `config_only` (random dummy weights) needs just config.json."""
    if not model_path.startswith(PREFIX):
        path = Path(model_path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"model_path {model_path!r} is not a directory (or use preset:NAME, "
                                    f"NAME in {configs.model_presets()})")
        return path
    name = model_path[len(PREFIX):]
    preset = configs.model_preset_path(name)
    root = Path(cache_dir or os.environ.get("MXROLL_CACHE") or Path.home() / ".cache" / "mxroll")
    if config_only:
        out = root / "presets" / f"{name}-config"
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(preset.read_text())
        return out
    out = root / "presets" / f"{name}-seed{seed}"
    if (out / "config.json").is_file():
        return out
    log.info("writing synthetic %s checkpoint (seed %d) to %s", name, seed, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        make_checkpoint(json.loads(preset.read_text()), tmp, seed=seed, progress=progress)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
