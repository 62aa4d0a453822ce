"""Scanner noise: a spectrum measured from scans minus reconstructions gives back noise of the
same level and texture; sites, pooling, bad spectra; saved with the generator, hash-checked;
samples carry it on the same anatomy."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from scipy import ndimage

from synthct.checkpoint import CheckpointError, build_generator, load_generator, save_generator
from synthct.models.scanner_noise import NoisePower, ScannerNoise, noise_power
from synthct.sampling import labels_to_indices, sample_volumes

SHAPE = (24, 24, 16)


def _correlated(n: int, std: float, sigma: float, seed: int) -> torch.Tensor:
    """N×1×X×Y×Z Gaussian noise blurred by ``sigma`` voxels (a scanner kernel), scaled to ``std``."""
    g = torch.Generator().manual_seed(seed)
    white = torch.randn((n, 1, *SHAPE), generator=g, dtype=torch.float64).numpy()
    blurred = torch.from_numpy(ndimage.gaussian_filter(white, (0, 0, sigma, sigma, sigma)))
    return (blurred / blurred.std() * std).float()


def _lag1(x: torch.Tensor) -> float:
    """Correlation of neighbouring voxels along x: the noise's grain."""
    a, b = x[..., :-1, :, :].flatten(), x[..., 1:, :, :].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _measured(std: float, sigma: float, seed: int = 0) -> tuple[ScannerNoise, torch.Tensor]:
    smooth = torch.full((6, 1, *SHAPE), 40.0)  # uniform soft tissue, as a reconstruction is
    noise = _correlated(6, std, sigma, seed)
    return ScannerNoise.from_power({"a": noise_power(smooth + noise, smooth)}), noise


def test_drawn_noise_has_the_measured_level_and_grain():
    model, noise = _measured(std=20.0, sigma=1.0)
    drawn = model.draw(["a"] * 6, SHAPE, torch.Generator().manual_seed(1))
    assert drawn.shape == (6, 1, *SHAPE)
    # the eroded soft-tissue mask cuts the volume's border: level within 15 %
    assert float(drawn.std()) == pytest.approx(float(noise.std()), rel=0.15)
    assert model.noise_std()["a"] == pytest.approx(float(noise.std()), rel=0.15)
    assert _lag1(drawn) == pytest.approx(_lag1(noise), abs=0.08)
    sharp, _ = _measured(std=20.0, sigma=0.3)
    assert _lag1(sharp.draw(["a"] * 6, SHAPE, torch.Generator().manual_seed(1))) < 0.5 * _lag1(
        drawn
    )


def test_each_site_gets_its_own_noise_and_others_the_pooled_one():
    quiet, _ = _measured(std=10.0, sigma=1.0)
    loud, _ = _measured(std=40.0, sigma=1.0, seed=1)
    model = ScannerNoise({"a": quiet.spectra["a"], "b": loud.spectra["a"]}, cases={"a": 3, "b": 1})
    g = torch.Generator().manual_seed(0)
    a, b, pooled, unseen = model.draw(["a", "b", None, "site_z"], SHAPE, g)
    assert float(b.std()) == pytest.approx(4 * float(a.std()), rel=0.15)
    expected = ((3 * 10.0**2 + 1 * 40.0**2) / 4) ** 0.5  # case-weighted power
    for x in (pooled, unseen):
        assert float(x.std()) == pytest.approx(expected, rel=0.15)


def test_power_pools_exactly_and_bad_spectra_are_refused():
    smooth = torch.zeros((4, 1, *SHAPE))
    noisy = smooth + _correlated(4, 20.0, 1.0, 0)
    whole = noise_power(noisy, smooth)
    parts = noise_power(noisy[:1], smooth[:1]) + noise_power(noisy[1:], smooth[1:])
    assert parts.cases == whole.cases == 4
    assert torch.allclose(parts.total, whole.total)
    spectrum = whole.total.float() / 4
    with pytest.raises(ValueError, match="negative or non-finite"):
        ScannerNoise({"a": -spectrum})
    with pytest.raises(ValueError, match="different or non-3D"):
        ScannerNoise({"a": spectrum, "b": spectrum[:-1]})
    with pytest.raises(ValueError, match="need"):
        ScannerNoise({"a": spectrum}).draw(["a"], (32, 32, 32), torch.Generator())
    with pytest.raises(ValueError, match="same N"):
        noise_power(noisy, smooth[:2])
    assert ScannerNoise.from_power(
        {"a": whole, "b": NoisePower(whole.total, 0)}
    ).spectra.keys() == {"a"}


@pytest.fixture()
def noisy_generator(tmp_path, smoke_config):
    gen = build_generator(smoke_config, seed=0)
    x, y, z = smoke_config.data.shape
    spectrum = torch.full((x, y, z // 2 + 1), 30.0**2)  # white noise, 30 HU
    site = smoke_config.site_names[0]
    gen.scanner_noise = ScannerNoise({site: spectrum}, {site: 7})
    save_generator(gen, tmp_path / "generator")
    return gen, tmp_path / "generator"


def test_saved_with_the_generator_and_hash_checked(noisy_generator):
    gen, path = noisy_generator
    loaded = load_generator(path)
    assert loaded.scanner_noise is not None
    assert loaded.scanner_noise.spectra.keys() == gen.scanner_noise.spectra.keys()
    for site, s in gen.scanner_noise.spectra.items():
        assert torch.equal(loaded.scanner_noise.spectra[site], s)
    file = path / "noise" / "scanner_noise.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="scanner_noise.safetensors: sha256 does not match"):
        load_generator(path)


def test_samples_carry_the_sites_noise_on_the_same_anatomy(noisy_generator):
    gen, _ = noisy_generator
    site = gen.config.site_names[0]
    labels = labels_to_indices(gen, ["normal", "nodule"])

    def sample(g=gen, **kw):
        return sample_volumes(
            g, labels, generator=torch.Generator().manual_seed(3), sites=[site, site], **kw
        )

    plain, noisy = sample(scanner_noise=False), sample()
    lo, hi = gen.config.data.hu_window
    inside = (plain > lo + 150) & (plain < hi - 150)  # away from the window's clamp
    diff = (noisy - plain)[inside]
    assert float(diff.std()) == pytest.approx(30.0, rel=0.1)
    assert abs(float(diff.mean())) < 3.0
    assert torch.equal(noisy, sample())  # seeded
    off = gen.config.sampling.model_copy(update={"scanner_noise": False})
    quiet = replace(gen, config=gen.config.model_copy(update={"sampling": off}))
    assert torch.equal(sample(quiet), plain)  # the generator's own setting turns it off


def test_the_command_line_leaves_the_noise_out_when_asked(noisy_generator, tmp_path):
    from synthct.cli import main
    from synthct.data.volume_io import read_volume

    _, path = noisy_generator  # not site-conditioned: its cases get the pooled noise
    args = ["sample", "--generator", str(path), "--label", "normal", "--n", "1"]
    assert main([*args, "--steps", "2", "--out", str(tmp_path / "on")]) == 0
    assert main([*args, "--steps", "2", "--no-scanner-noise", "--out", str(tmp_path / "off")]) == 0
    stem = "normal_pooled_seed0"
    on, off = (json.loads((tmp_path / d / f"{stem}.json").read_text()) for d in ("on", "off"))
    assert on["scanner_noise"] is True and off["scanner_noise"] is False
    a, b = (read_volume(tmp_path / d / f"{stem}_0000.nii.gz").hu for d in ("on", "off"))
    assert float((a - b).std()) > 10.0  # 30 HU noise, clamped at the window's edges


def test_spectra_that_do_not_fit_the_volumes_are_refused_naming_the_file(tmp_path, smoke_config):
    gen = build_generator(smoke_config, seed=0)
    gen.scanner_noise = ScannerNoise({"site_a": torch.ones(4, 4, 3)})
    save_generator(gen, tmp_path / "generator")
    with pytest.raises(
        CheckpointError, match=r"scanner_noise.safetensors: spectra of shape \(4, 4, 3\)"
    ):
        load_generator(tmp_path / "generator")
