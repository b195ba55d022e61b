"""Packaged configs: model presets (HF config.json), engine defaults, rollout jobs and prompt sets."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def model_preset_path(name: str) -> Path:
    return _preset_path("models", "json", "model preset", name)


def model_presets() -> list[str]:
    return sorted(p.stem for p in (ROOT / "models").glob("*.json"))


def prompt_preset_path(name: str) -> Path:
    """configs/prompts/NAME.jsonl: a built-in prompt set for rollout jobs."""
    return _preset_path("prompts", "jsonl", "prompt preset", name)


def prompt_presets() -> list[str]:
    return sorted(p.stem for p in (ROOT / "prompts").glob("*.jsonl"))


def _preset_path(folder: str, ext: str, kind: str, name: str) -> Path:
    path = ROOT / folder / f"{name}.{ext}"
    if not isinstance(name, str) or "/" in name or not path.is_file():
        known = sorted(p.stem for p in (ROOT / folder).glob(f"*.{ext}"))
        raise ValueError(f"unknown {kind} {name!r}; known presets: {', '.join(known)}")
    return path
