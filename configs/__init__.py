"""Packaged configs: model presets (HF config.json), engine defaults and rollout jobs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def model_preset_path(name: str) -> Path:
    path = ROOT / "models" / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (ROOT / "models").glob("*.json"))
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(known)}")
    return path


def model_presets() -> list[str]:
    return sorted(p.stem for p in (ROOT / "models").glob("*.json"))
