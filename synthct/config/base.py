"""What every configuration section shares: strict models and the configuration error."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from synthct.errors import SynthctError

PositiveFloat = Annotated[float, Field(gt=0)]


class ConfigError(SynthctError, ValueError):
    """A configuration file failed validation; the message names file, key path and value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
