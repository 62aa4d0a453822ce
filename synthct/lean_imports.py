"""Keep Hugging Face ``transformers`` out of ``import monai``.

``import monai`` imports every MONAI network, and ``monai.networks.nets.transchex`` then imports
``transformers`` (installed here only because peft needs it) and with it ``torch.distributed``
and ``torch._dynamo``: 2.2 s of every process's start on 2 cores (importing the Flower app: 5.5 s
without this guard, 3.3 s with it; ``bench/import_cost.py``), paid again by every Flower
ClientApp process, which Flower starts once per message. synthct never builds Transchex.
This finder refuses ``transformers`` to that one MONAI module, which MONAI's own
``optional_import`` records as "not installed" (using Transchex would raise); everyone else,
peft included, imports ``transformers`` as usual.
Nothing is refused once ``transformers`` is imported (its cost is paid), nor when the
environment sets ``SYNTHCT_MONAI_TRANSFORMERS=1`` (a process that builds Transchex itself).
"""

from __future__ import annotations

import importlib.abc
import os
import sys

__all__ = ["install"]

_BLOCKED_FOR = "monai.networks.nets.transchex"


class _TransformersNotForTranschex(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers" and not fullname.startswith("transformers."):
            return None
        if "transformers" in sys.modules:  # already paid for: MONAI may have it too
            return None
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get("__name__") == _BLOCKED_FOR:
                raise ModuleNotFoundError(
                    f"transformers is not imported for {_BLOCKED_FOR} (see synthct.lean_imports)",
                    name=fullname,
                )
            frame = frame.f_back
        return None  # anyone else: the normal finders


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once per process; not with
    ``SYNTHCT_MONAI_TRANSFORMERS=1``)."""
    if os.environ.get("SYNTHCT_MONAI_TRANSFORMERS") == "1":
        return
    if not any(isinstance(f, _TransformersNotForTranschex) for f in sys.meta_path):
        sys.meta_path.insert(0, _TransformersNotForTranschex())
