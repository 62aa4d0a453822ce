"""The one base class of user-facing errors, importable without torch, MONAI or Flower.

Every error that means "the input or the request is wrong" (a bad config, manifest, volume,
checkpoint, cohort, gate report, plugin, or a federated run that cannot go on) derives from
:class:`SynthctError`, so the command line answers all of them the same way (one line, exit 2)
without importing the heavy modules that raise them before it has parsed its arguments.
"""

from __future__ import annotations

__all__ = ["SynthctError", "UsageError"]


class SynthctError(Exception):
    """A user mistake or bad input; the message names the file, key or value at fault."""


class UsageError(SynthctError):
    """A command-line request that cannot be carried out as given (an output path of the wrong
    kind, a device that is not there)."""
