"""Configuration of the data: the label vocabulary, the sites (scanners) and their phantom
profiles, the splits and the lesions."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from synthct.config.base import PositiveFloat, _Strict


class LabelConfig(_Strict):
    """The label vocabulary: ordered class names. Index ``len(classes)`` is the null class."""

    classes: list[str] = Field(min_length=2)
    rare: list[str] = Field(default_factory=list, description="classes reported first")

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"class names must be unique, got {v}")
        for name in v:
            if not name or not name.replace("_", "").isalnum():
                raise ValueError(f"class name {name!r} must be alphanumeric/underscore")
        return v

    @model_validator(mode="after")
    def _rare_known(self) -> LabelConfig:
        unknown = [r for r in self.rare if r not in self.classes]
        if unknown:
            raise ValueError(f"rare classes {unknown} are not in classes {self.classes}")
        return self

    @property
    def vocabulary_hash(self) -> str:
        """Stable hash of the ordered vocabulary; models and plugins must agree on it."""
        blob = json.dumps(self.classes, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int:
        try:
            return self.classes.index(name)
        except ValueError:
            raise KeyError(f"unknown class {name!r}; vocabulary is {self.classes}") from None


class SiteProfile(_Strict):
    """One hospital: how its scanner images and which cases it has (phantom generation).

    ``label_map`` maps the site's own label names to vocabulary classes; a real-data site needs
    only ``name`` and, if its labels differ, ``label_map``.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    counts: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    noise_hu: float = Field(default=15.0, ge=0, le=200)
    hu_offset: float = Field(default=0.0, ge=-200, le=200)
    blur_mm: float = Field(default=0.0, ge=0, le=30)
    slice_mm: PositiveFloat = 10.0
    fov_mm: float = Field(default=360.0, ge=150, le=700)
    orientation: Literal["RAS", "LPS"] = "RAS"
    label_map: dict[str, str] = Field(default_factory=dict)


class SplitFractions(_Strict):
    """The one split contract: train (learn), holdout (gate compares), test (downstream).

    ``test`` may be 0 when the test split is a separate balanced set (``data.test_per_class``).
    """

    train: float = Field(default=0.6, gt=0, lt=1)
    holdout: float = Field(default=0.2, gt=0, lt=1)
    test: float = Field(default=0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitFractions:
        total = self.train + self.holdout + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total:.4f}")
        return self


def _ordered(name: str, v: tuple[float, float]) -> tuple[float, float]:
    if not v[0] <= v[1]:
        raise ValueError(f"{name} must be [low, high] with low <= high, got {list(v)}")
    return v


class LesionProfile(_Strict):
    """How visible each phantom lesion is: the difficulty of the phantom benchmark.

    Each pair is a ``[low, high]`` range a case draws from uniformly. The defaults are the
    original, easy phantoms (a converged classifier scores 1.0); ``configs/demo.yaml`` sets
    subtler lesions so a real-only classifier has room to gain (see docs/benchmarks.md).
    """

    nodule_radius_mm: tuple[PositiveFloat, PositiveFloat] = (33.0, 37.0)
    nodule_hu: tuple[float, float] = (25.0, 60.0)
    ground_glass_radius_mm: tuple[PositiveFloat, PositiveFloat] = (48.0, 62.0)
    ground_glass_hu: tuple[float, float] = Field(
        default=(-600.0, -430.0), description="target HU of the haze centre (lung is -860)"
    )
    consolidation_cut: tuple[float, float] = Field(
        default=(-0.15, 0.15),
        description="the dense region is where the dependent-lung coordinate exceeds the cut "
        "(higher = a smaller region; about -0.15 is half a lung)",
    )

    @field_validator(
        "nodule_radius_mm",
        "nodule_hu",
        "ground_glass_radius_mm",
        "ground_glass_hu",
        "consolidation_cut",
    )
    @classmethod
    def _low_high(cls, v: tuple[float, float], info) -> tuple[float, float]:
        return _ordered(info.field_name, v)


class DataConfig(_Strict):
    """Geometry of model input and the sites. Spatial axes are RAS voxel order (x, y, z).

    ``test_per_class`` > 0 gives every site a balanced ``test`` split of that many phantoms per
    class (also of classes the site never has in ``train``), rendered apart from ``counts``,
    which then fill ``train`` and ``holdout`` only (``splits.test`` must be 0): rare-class
    recall per site needs more than the one or two rare test cases a fraction leaves.
    """

    shape: tuple[int, int, int] = (32, 32, 32)
    spacing_mm: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (11.0, 11.0, 10.0)
    hu_window: tuple[float, float] = (-1024.0, 1024.0)
    roi: Literal["none", "lung"] = "none"
    splits: SplitFractions = SplitFractions()
    test_per_class: int = Field(default=0, ge=0, le=1000)
    lesions: LesionProfile = LesionProfile()
    sites: list[SiteProfile] = Field(min_length=1)

    @field_validator("shape")
    @classmethod
    def _shape_ok(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        for s in v:
            if s < 16 or s % 8:
                raise ValueError(f"each size must be >= 16 and a multiple of 8, got {list(v)}")
        return v

    @field_validator("hu_window")
    @classmethod
    def _window_ok(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _one_test_source(self) -> DataConfig:
        if self.test_per_class > 0 and self.splits.test > 0:
            raise ValueError(
                "splits.test must be 0 when test_per_class > 0 (the balanced set is the test split)"
            )
        if self.test_per_class == 0 and self.splits.test == 0:
            raise ValueError("no test split: set splits.test > 0 or test_per_class > 0")
        return self

    @model_validator(mode="after")
    def _unique_sites(self) -> DataConfig:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        return self


# Fields that shape a training loss, not a network: weights trained under one value load
# under another (e.g. a continuation that adds the detail term).
