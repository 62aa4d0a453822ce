"""Checkpoint round trip on outputs, tampering refused, sampling determinism and guidance."""

from __future__ import annotations

import pytest
import torch

from synthct.checkpoint import CheckpointError, build_generator, load_generator, save_generator
from synthct.models.latent_norm import LatentNorm
from synthct.sampling import labels_to_indices, sample_volumes


@pytest.fixture()
def saved(tmp_path, smoke_config):
    gen = build_generator(smoke_config, seed=0)
    with torch.no_grad():  # make EMA differ from the raw UNet so the round trip is meaningful
        for p in gen.ema.parameters():
            p.add_(0.01)
    gen.latent_norm = LatentNorm((0.1, -0.2), (1.7, 0.6))
    save_generator(gen, tmp_path / "generator")
    return gen, tmp_path / "generator"


def _sample(gen, **kw):
    labels = labels_to_indices(gen, ["nodule", "normal", "consolidation"])
    return sample_volumes(gen, labels, generator=torch.Generator().manual_seed(5), **kw)


def test_round_trip_reproduces_outputs(saved):
    gen, path = saved
    loaded = load_generator(path)
    assert loaded.latent_norm == gen.latent_norm
    a, b = _sample(gen), _sample(loaded)
    assert a.shape == (3, 1, *gen.config.data.shape)
    assert torch.equal(a, b)


def test_sampling_deterministic_and_guidance_matters(saved):
    gen, _ = saved
    assert torch.equal(_sample(gen), _sample(gen))
    assert not torch.equal(_sample(gen, guidance=1.0), _sample(gen, guidance=4.0))
    assert not torch.equal(_sample(gen, guidance=0.0), _sample(gen, guidance=1.0))
    hu = _sample(gen)
    lo, hi = gen.config.data.hu_window
    assert hu.min() >= lo and hu.max() <= hi


@pytest.mark.parametrize("sampler", ["dpmpp_sde", "euler_a"])
def test_stochastic_samplers_are_seeded_and_differ_from_the_ode_solver(saved, sampler):
    gen, _ = saved
    a = _sample(gen, sampler=sampler)
    assert torch.equal(a, _sample(gen, sampler=sampler))  # the seed fixes the injected noise
    assert torch.isfinite(a).all() and not torch.equal(a, _sample(gen))


def test_guidance_interval_limits_where_guidance_applies(saved):
    gen, _ = saved

    def with_interval(low, high):
        sampling = gen.config.sampling.model_copy(update={"guidance_interval": (low, high)})
        gen.config = gen.config.model_copy(update={"sampling": sampling})
        return _sample(gen, guidance=4.0)

    full, none = with_interval(0.0, 1.0), with_interval(0.9995, 1.0)
    assert torch.equal(none, _sample(gen, guidance=1.0))  # no step in the interval
    middle = with_interval(0.2, 0.8)
    assert not torch.equal(middle, full) and not torch.equal(middle, none)
    with pytest.raises(ValueError, match="guidance_interval"):
        gen.config.sampling.model_validate({"guidance_interval": [0.8, 0.2]})


def test_unknown_label(saved):
    gen, _ = saved
    with pytest.raises(ValueError, match="unknown class 'tumour'"):
        labels_to_indices(gen, ["tumour"])


def test_tampered_and_truncated_weights_refused(saved):
    _, path = saved
    unet = path / "unet.safetensors"
    original = unet.read_bytes()
    data = bytearray(original)
    data[-10] ^= 0xFF
    unet.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="unet.safetensors: sha256 does not match"):
        load_generator(path)
    unet.write_bytes(original)
    (path / "ema.safetensors").write_bytes((path / "ema.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="ema.safetensors: size"):
        load_generator(path)


def test_missing_generator(tmp_path):
    with pytest.raises(CheckpointError, match="config.json missing"):
        load_generator(tmp_path)


def test_sliding_window_decode_close_to_whole(smoke_config, tmp_path):
    from synthct.sampling import decode_latents

    gen = build_generator(smoke_config, seed=0)
    z = torch.randn(1, *smoke_config.latent_shape)
    whole = decode_latents(gen, z)
    assert torch.equal(decode_latents(gen, z, patch=8), whole)  # window covers all: no patching
    patched = decode_latents(gen, z, patch=4)
    assert patched.shape == whole.shape
    corr = torch.corrcoef(torch.stack([patched.flatten(), whole.flatten()]))[0, 1]
    assert corr > 0.5  # same content up to window-border effects of an untrained decoder


def test_sampling_only_checkpoint_is_smaller_and_samples_the_same(saved, tmp_path):
    gen, directory = saved
    slim = save_generator(load_generator(directory), tmp_path / "slim", sampling_only=True)
    assert not (slim / "unet.safetensors").exists()
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))  # noqa: E731
    assert size(slim) < 0.7 * size(directory)
    a, b = load_generator(directory), load_generator(slim)
    labels = torch.tensor([0, 1])
    va = sample_volumes(a, labels, generator=torch.Generator().manual_seed(3))
    vb = sample_volumes(b, labels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(va, vb)  # sampling uses the EMA UNet, which both keep
    for k, v in b.unet.state_dict().items():  # the UNet restarts from the EMA
        assert torch.equal(v, b.ema.state_dict()[k])


def test_missing_pretrained_is_a_clear_error(monkeypatch, tmp_path):
    import synthct.pretrained as pretrained

    monkeypatch.setattr(pretrained, "phantom_dir", lambda: tmp_path / "absent")
    with pytest.raises(CheckpointError, match="not part of this install"):
        pretrained.load_phantom_generator()
