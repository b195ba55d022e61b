"""mxroll: an RL rollout engine for DeepSeek-V3-architecture models whose numerics follow the trainer's.

`from mxroll import Engine`; the parts are `mxroll.model`, `mxroll.precision`, `mxroll.rollout`,
`mxroll.sync` and `mxroll.configs`. Installed from a wheel they live inside this folder; in a
source checkout they are its siblings at the repository root, and this package points there.
"""
from __future__ import annotations

import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "rollout")) and _os.path.isfile(_os.path.join(_checkout, "rollout",
                                                                                          "engine.py")):
    __path__.append(_checkout)  # noqa: F821 - the package's own search path

__all__ = ["Engine", "SamplingParams"]


def __getattr__(name: str):
    # Lazy, so that `import mxroll.precision.mxfp8` does not pull in the engine.
    if name in __all__:
        from .rollout import Engine, SamplingParams
        return {"Engine": Engine, "SamplingParams": SamplingParams}[name]
    raise AttributeError(f"module 'mxroll' has no attribute {name!r}")
