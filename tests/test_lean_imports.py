"""``import monai`` no longer drags in Hugging Face transformers; peft still gets it."""

from __future__ import annotations

import os
import subprocess
import sys

GUARDED = """
import sys
import synthct.fed.app  # every ClientApp process starts with this import
assert "transformers" not in sys.modules, "monai's Transchex imported transformers"
from monai.networks.nets import transchex
assert transchex.transformers[1] is False  # MONAI's record: optional dependency missing
try:
    transchex.Transchex(
        in_channels=1, img_size=(8, 8), num_classes=2, patch_size=(4, 4),
        num_language_layers=1, num_vision_layers=1, num_mixed_layers=1,
    )
except Exception as error:  # MONAI's own 'optional dependency missing' error
    assert "transformers" in str(error), error
else:
    raise AssertionError("Transchex built without transformers")
import peft  # plugins: peft needs the real transformers
assert "transformers" in sys.modules and peft.LoraConfig
"""

UNGUARDED = """
import sys
import synthct
from monai.networks.nets import transchex
assert transchex.transformers[1] is True and "transformers" in sys.modules
"""


def _run(code: str, **env: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert run.returncode == 0, run.stderr[-3000:]


def test_monai_imports_without_transformers_and_peft_still_gets_it():
    _run(GUARDED)


def test_transformers_already_imported_or_asked_for_is_left_to_monai():
    _run("import transformers\n" + UNGUARDED)  # its cost is paid: MONAI gets it as before
    _run(UNGUARDED, SYNTHCT_MONAI_TRANSFORMERS="1")
