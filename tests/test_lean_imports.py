"""``import monai`` no longer drags in Hugging Face transformers; peft still gets it."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import synthct.fed.app  # every ClientApp process starts with this import
assert "transformers" not in sys.modules, "monai's Transchex imported transformers"
import monai.networks.nets as nets
try:
    nets.Transchex(
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


def test_monai_imports_without_transformers_and_peft_still_gets_it():
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
