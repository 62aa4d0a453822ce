"""Federated training through Flower's simulation engine (Ray), on the smoke sites.

The engine really runs: every site is a virtual SuperNode executing the ClientApp. What the
server aggregates is checked against what the sites' audit logs say they sent.
"""

from __future__ import annotations

import csv
import json
import math
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from synthct.checkpoint import build_generator, load_generator
from synthct.data.dataset import load_cases
from synthct.fed.errors import FederatedError
from synthct.fed.simulation import train_federated
from synthct.fed.sites import PromptGrid
from synthct.models.conditioning import is_per_site_table
from synthct.models.latent_norm import fit_latent_norm
from synthct.training import ema_decay_at, encode_latents

pytestmark = pytest.mark.slow


def _rounds(run) -> list[dict]:
    return [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]


def _audit(run, site) -> list[dict]:
    """A site's audit records, after checking that their hash chain is intact."""
    from synthct.audit import verify_chain

    path = run / "sites" / site / "audit.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert verify_chain(path) == (len(records), records[-1]["chain"])
    return records


def _payload(run, site, phase, rnd) -> dict[str, torch.Tensor]:
    return load_file(run / "sites" / site / "payloads" / f"{phase}-round{rnd:04d}.safetensors")


def _weighted_mean(run, record) -> dict[str, torch.Tensor]:
    total = sum(s["cases"] for s in record["sites"])
    out: dict[str, torch.Tensor] = {}
    for s in record["sites"]:
        payload = _payload(run, s["site"], record["phase"], record["round"])
        for k, v in payload.items():
            out[k] = out.get(k, 0) + v.double() * (s["cases"] / total)
    return out


def _train_counts(manifest) -> Counter:
    with open(manifest, newline="") as f:
        return Counter(r["site"] for r in csv.DictReader(f) if r["split"] == "train")


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory, smoke_config, smoke_sites):
    run = tmp_path_factory.mktemp("fed") / "run"
    gen = train_federated(smoke_config, smoke_sites, run, keep_payloads=True)
    return run, gen


def test_rounds_are_logged_with_sites_bytes_and_audit(fed_run, smoke_config, smoke_sites):
    run, _ = fed_run
    rounds = _rounds(run)
    assert [(r["phase"], r["round"]) for r in rounds] == [
        ("autoencoder", 1),
        ("autoencoder", 2),
        ("decoder", 1),
        ("scale", 0),
        ("diffusion", 1),
        ("diffusion", 2),
    ]
    counts = _train_counts(smoke_sites)
    for r in rounds:
        if r["phase"] == "scale":
            assert r["cases"] == dict(counts) and min(r["latent_norm"]["scale"]) > 0
            continue
        assert r["replies"] == r["sent"] == 3 and r["failures"] == [] and r["aggregated"]
        assert {s["site"]: s["cases"] for s in r["sites"]} == dict(counts)
        assert r["bytes_up"] == sum(s["bytes_up"] for s in r["sites"]) > 0
        assert r["bytes_down"] >= r["bytes_up"]  # the diffusion phase also ships the frozen AE
        for s in r["sites"]:
            sent = [
                a
                for a in _audit(run, s["site"])
                if (a["phase"], a["round"]) == (r["phase"], r["round"])
            ]
            assert len(sent) == 1 and sent[0]["sha256"] == s["sha256_up"]
            assert sent[0]["bytes"] == s["bytes_up"]
    # the decoder phase sends the decoding half only
    by_key = {(r["phase"], r["round"]): r for r in rounds}
    assert by_key[("decoder", 1)]["bytes_up"] < by_key[("autoencoder", 2)]["bytes_up"]
    sent = _payload(run, "site_a", "decoder", 1)
    assert sent and all(k.startswith(("decoder.", "post_quant_conv.")) for k in sent)


def test_aggregate_is_the_case_weighted_mean(fed_run):
    run, gen = fed_run
    by_key = {(r["phase"], r["round"]): r for r in _rounds(run)}
    expected_ae = _weighted_mean(run, by_key[("autoencoder", 2)])
    expected_ae.update(_weighted_mean(run, by_key[("decoder", 1)]))  # encoder left as it was
    for k, v in gen.autoencoder.state_dict().items():
        assert torch.allclose(v.double(), expected_ae[k], atol=1e-6), k
    expected_unet = _weighted_mean(run, by_key[("diffusion", 2)])
    for k, v in gen.unet.state_dict().items():
        assert torch.allclose(v.double(), expected_unet[k], atol=1e-6), k


def test_server_ema_and_pooled_latent_norm(fed_run, smoke_config, smoke_sites):
    run, gen = fed_run
    by_key = {(r["phase"], r["round"]): r for r in _rounds(run)}
    # warm-up: round 1 (steps 1..k) starts with a copy, round 2 multiplies steps k+1..2k
    local, decay = smoke_config.federated.local_steps_diffusion, smoke_config.diffusion.ema_decay
    d2 = math.prod(ema_decay_at(decay, s) for s in range(local + 1, 2 * local + 1))
    w1 = _weighted_mean(run, by_key[("diffusion", 1)])
    w2 = _weighted_mean(run, by_key[("diffusion", 2)])
    for k, v in gen.ema.state_dict().items():
        if not v.is_floating_point():
            continue
        expected = d2 * w1[k] + (1 - d2) * w2[k]
        assert torch.allclose(v.double(), expected, atol=1e-5), k
    # the normalisation pooled from site moments equals the one computed on pooled latents
    train = load_cases(smoke_sites, smoke_config, splits=("train",))
    z = encode_latents(gen.autoencoder, train.images)
    expected = fit_latent_norm(z, smoke_config.diffusion.latent_norm)
    assert gen.latent_norm.mode == smoke_config.diffusion.latent_norm
    assert gen.latent_norm.scale == pytest.approx(expected.scale, rel=1e-4)
    assert gen.latent_norm.shift == pytest.approx(expected.shift, rel=1e-4, abs=1e-6)
    assert load_generator(run / "generator").latent_norm == gen.latent_norm


def test_fine_tuning_continues_the_trained_ema(tmp_path, fed_run, smoke_config, smoke_sites):
    # a pretrained generator's EMA is continued at the full decay: restarting the warm-up
    # would replace it by the first fine-tune round's aggregate
    run, trained = fed_run
    config = smoke_config.model_copy(
        update={
            "federated": smoke_config.federated.finetune_schedule().model_copy(
                update={"diffusion_rounds": 1}
            )
        }
    )
    tuned = train_federated(
        config, smoke_sites, tmp_path / "tune", keep_payloads=True, initial=run / "generator"
    )
    d = config.diffusion.ema_decay**config.federated.local_steps_diffusion
    w1 = _weighted_mean(tmp_path / "tune", _rounds(tmp_path / "tune")[-1])
    before = trained.ema.state_dict()
    for k, v in tuned.ema.state_dict().items():
        if v.is_floating_point():
            expected = d * before[k].double() + (1 - d) * w1[k]
            assert torch.allclose(v.double(), expected, atol=1e-5), k
    state = json.loads((tmp_path / "tune" / "fed_state.json").read_text())
    assert state["ema_steps"] is None


def test_another_latent_normalisation_restarts_the_unet(
    tmp_path, fed_run, smoke_config, smoke_sites
):
    # a generator continued under the other latent normalisation: its autoencoder is kept,
    # the latents are normalised anew from the sites' moments and the UNet (learnt in the old
    # latent space) starts afresh with the EMA warm-up
    run, trained = fed_run
    other = "per_channel" if trained.latent_norm.mode == "global" else "global"
    config = smoke_config.model_copy(
        update={
            "federated": smoke_config.federated.finetune_schedule().model_copy(
                update={"diffusion_rounds": 1}
            ),
            "diffusion": smoke_config.diffusion.model_copy(update={"latent_norm": other}),
        }
    )
    tuned = train_federated(config, smoke_sites, tmp_path / "renorm", initial=run / "generator")
    assert tuned.latent_norm.mode == other
    train = load_cases(smoke_sites, smoke_config, splits=("train",))
    expected = fit_latent_norm(encode_latents(trained.autoencoder, train.images), other)
    assert tuned.latent_norm.scale == pytest.approx(expected.scale, rel=1e-4)
    for k, v in tuned.autoencoder.state_dict().items():
        assert torch.equal(v, trained.autoencoder.state_dict()[k]), k
    state = json.loads((tmp_path / "renorm" / "fed_state.json").read_text())
    assert state["ema_steps"] == config.federated.local_steps_diffusion  # warm-up from zero
    assert state["latent_norm"]["scale"] == pytest.approx(list(expected.scale), rel=1e-4)


def test_restart_unet_keeps_the_autoencoder_and_trains_a_fresh_site_conditioned_unet(
    tmp_path, fed_run, smoke_config, smoke_sites
):
    # federated.restart_unet: a class-only generator continued with the site as a condition
    # from the UNet's first step; the autoencoder (and its latent normalisation) is kept, the
    # UNet and its EMA start afresh (EMA warm-up from zero), not adopted with zero site rows
    run, trained = fed_run
    config = smoke_config.model_copy(
        update={
            "federated": smoke_config.federated.finetune_schedule().model_copy(
                update={"diffusion_rounds": 1, "restart_unet": True}
            ),
            "unet": smoke_config.unet.model_copy(
                update={"site_conditioning": True, "site_norms": True}
            ),
        }
    )
    tuned = train_federated(config, smoke_sites, tmp_path / "fresh", initial=run / "generator")
    for k, v in tuned.autoencoder.state_dict().items():
        assert torch.equal(v, trained.autoencoder.state_dict()[k]), k
    assert tuned.latent_norm.scale == trained.latent_norm.scale
    state = json.loads((tmp_path / "fresh" / "fed_state.json").read_text())
    assert state["ema_steps"] == config.federated.local_steps_diffusion  # warm-up from zero
    assert tuned.conditioning.site_conditioned
    # adopted, the class rows would be the trained ones (moved by one short round)
    classes = tuned.unet.class_embedding.classes.weight
    assert not torch.allclose(classes, trained.unet.class_embedding.weight, atol=0.05)
    _check_site_calibration(tuned, config, smoke_sites, tmp_path / "fresh")


def _check_site_calibration(before, config, smoke_sites, run) -> None:
    """The finished site-conditioned ``run`` given a calibration round: each site trains its
    own rows of every per-site table (its site embedding and, with ``unet.site_norms``, every
    GroupNorm's scale and shift) against the EMA UNet; every other weight (the null site's
    rows included) stays as it was and the EMA takes the rows as trained, so the UNet that
    samples is the one calibrated."""
    ema = {k: v.clone() for k, v in before.ema.state_dict().items()}
    fed = config.federated.model_copy(update={"site_calibration_rounds": 1})
    after = train_federated(
        config.model_copy(update={"federated": fed}), smoke_sites, run, resume=True
    )
    tables = [k for k in ema if is_per_site_table(k)]
    assert "class_embedding.sites.weight" in tables
    assert len(tables) > 1 + config.unet.site_norms * 10  # the norms' tables too
    sites = list(config.site_names)
    for k, v in after.ema.state_dict().items():
        assert torch.equal(v, after.unet.state_dict()[k]), k
        if k not in tables:
            assert torch.equal(v, ema[k]), k
            continue
        rows, old = v, ema[k]
        for i in range(len(sites)):
            assert not torch.allclose(rows[i], old[i]), (k, sites[i])
        assert torch.equal(rows[len(sites) :], old[len(sites) :]), k  # null site and spares
    more = fed.model_copy(update={"diffusion_rounds": fed.diffusion_rounds + 1})
    with pytest.raises(FederatedError, match="calibrated after diffusion round 1"):
        train_federated(
            config.model_copy(update={"federated": more}), smoke_sites, run, resume=True
        )
    last = _rounds(run)[-1]
    assert (last["phase"], last["round"]) == ("diffusion", 2)
    assert set(last["calibration"]["rows_moved"]) == set(sites)
    assert min(last["calibration"]["rows_moved"].values()) > 0
    assert last["calibration"]["tables"] == len(tables)


def test_a_trained_generator_learns_site_style_adversarially(
    tmp_path, fed_run, smoke_config, smoke_sites
):
    # a class-only generator adopted under a site-aware config: the decoder round trains the
    # site style and the patch discriminator (both travel and are averaged), the diffusion
    # round the UNet's site table
    run, _ = fed_run
    schedule = smoke_config.federated.finetune_schedule().model_copy(
        update={"decoder_rounds": 1, "diffusion_rounds": 1}
    )
    config = smoke_config.model_copy(
        update={
            "federated": schedule,
            "autoencoder": smoke_config.autoencoder.model_copy(
                update={"site_style": True, "adversarial_weight": 0.05}
            ),
            "unet": smoke_config.unet.model_copy(update={"site_conditioning": True}),
        }
    )
    tune = tmp_path / "styled"
    tuned = train_federated(
        config, smoke_sites, tune, keep_payloads=True, initial=run / "generator"
    )
    decoder_round = next(r for r in _rounds(tune) if r["phase"] == "decoder")
    sent = _payload(tune, "site_a", "decoder", 1)
    assert any(k.startswith("site_style.") for k in sent)
    assert any(k.startswith("discriminator.") for k in sent)
    mean = _weighted_mean(tune, decoder_round)
    saved = load_generator(tune / "generator")
    assert torch.allclose(
        saved.discriminator.state_dict()["final_conv.conv.weight"].double(),
        mean["discriminator.final_conv.conv.weight"],
        atol=1e-6,
    )
    bias = saved.autoencoder.site_style.feature_bias.weight
    rows = saved.autoencoder.site_style.indices(config.site_names)
    assert all(bias[r].abs().sum() > 0 for r in rows.tolist())  # every site's style moved
    assert saved.unet.class_embedding.sites.weight.abs().sum() > 0
    assert tuned.renders_sites
    # its decoder renders each site: every site measured its scanner noise against it (a
    # site-agnostic decoder's run measures none: test_rounds_are_logged_...)
    counts = _train_counts(smoke_sites)
    (noise,) = [r for r in _rounds(tune) if r["phase"] == "noise"]
    assert noise["cases"] == dict(counts) and noise["rejected"] == {}
    assert set(noise["noise_std_hu"]) == set(counts)
    assert all(0 < v < 1000 for v in noise["noise_std_hu"].values())  # HU, a scanner's
    assert saved.scanner_noise is not None and saved.scanner_noise.cases == dict(counts)
    assert [r["phase"] for r in _rounds(tune)].index("noise") < [
        r["phase"] for r in _rounds(tune)
    ].index("diffusion")


def test_resumed_run_equals_uninterrupted(tmp_path, fed_run, smoke_config, smoke_sites):
    full_run, full = fed_run
    part = tmp_path / "part"
    train_federated(smoke_config, smoke_sites, part, max_rounds=3)
    state = json.loads((part / "fed_state.json").read_text())
    # autoencoder and decoder rounds done and the latent normalisation pooled; no diffusion yet
    assert (state["phase"], state["round"]) == ("diffusion", 0)
    assert min(state["latent_norm"]["scale"]) > 0
    resumed = train_federated(smoke_config, smoke_sites, part, resume=True)
    for name in ("autoencoder", "unet", "ema"):
        a, b = getattr(full, name).state_dict(), getattr(resumed, name).state_dict()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6), f"{name}.{k}"
    assert [(r["phase"], r["round"]) for r in _rounds(part)] == [
        (r["phase"], r["round"]) for r in _rounds(full_run)
    ]
    # a finished run resumed under a config with one more diffusion round runs just that round
    rounds = smoke_config.federated.diffusion_rounds + 1
    longer = smoke_config.model_copy(
        update={"federated": smoke_config.federated.model_copy(update={"diffusion_rounds": rounds})}
    )
    train_federated(longer, smoke_sites, part, resume=True)
    assert [(r["phase"], r["round"]) for r in _rounds(part)][-2:] == [
        ("diffusion", smoke_config.federated.diffusion_rounds),
        ("diffusion", longer.federated.diffusion_rounds),
    ]
    state = json.loads((part / "fed_state.json").read_text())
    assert (state["phase"], state["round"]) == ("done", longer.federated.diffusion_rounds)


def test_failed_and_slow_sites_do_not_stop_rounds(tmp_path, smoke_config, smoke_sites):
    doc = smoke_config.model_dump()
    doc["federated"].update(
        {
            "decoder_rounds": 0,  # the two autoencoder rounds are the ones under test
            "diffusion_rounds": 0,
            # round 1 includes the sites' cold start (Ray actors importing torch + MONAI: 15 s
            # and more on 2 busy cores, so 15 s timed every site out there)
            "round_timeout_s": 30.0,
            "faults": [
                {"site": "site_b", "phase": "autoencoder", "round": 1, "kind": "error"},
                {
                    "site": "site_c",
                    "phase": "autoencoder",
                    "round": 2,
                    "kind": "delay",
                    "delay_s": 45,
                },
            ],
        }
    )
    config = type(smoke_config).model_validate(doc)
    run = tmp_path / "faults"
    start = time.monotonic()
    train_federated(config, smoke_sites, run)
    assert time.monotonic() - start < 150  # the server did not wait out site_c's 45 s
    r1, r2 = _rounds(run)[:2]
    assert r1["replies"] == 2 and r1["aggregated"] and len(r1["failures"]) == 1
    assert (
        "site_b" in r1["failures"][0]["reason"] and "injected fault" in r1["failures"][0]["reason"]
    )
    assert {s["site"] for s in r1["sites"]} == {"site_a", "site_c"}
    assert r2["replies"] == 2 and r2["timed_out"] == 1 and r2["aggregated"]
    assert {s["site"] for s in r2["sites"]} == {"site_a", "site_b"}


def test_broken_and_hostile_updates_are_rejected_and_the_round_goes_on(
    tmp_path, smoke_config, smoke_sites
):
    """A site that sends NaN, or weights scaled 1000x, is named in the round log and left out
    of that round's average; the other sites' round is aggregated as usual."""
    doc = smoke_config.model_dump()
    doc["federated"].update(
        {
            "ae_rounds": 2,
            "decoder_rounds": 0,
            "diffusion_rounds": 0,
            "round_timeout_s": 120.0,
            "faults": [
                {"site": "site_a", "phase": "autoencoder", "round": 1, "kind": "nan"},
                {"site": "site_c", "phase": "autoencoder", "round": 2, "kind": "huge"},
            ],
        }
    )
    config = type(smoke_config).model_validate(doc)
    run = tmp_path / "hostile"
    gen = train_federated(config, smoke_sites, run)
    r1, r2 = _rounds(run)[:2]
    assert r1["aggregated"] and {s["site"] for s in r1["sites"]} == {"site_b", "site_c"}
    assert r1["failures"][0]["site"] == "site_a" and "NaN" in r1["failures"][0]["reason"]
    assert r2["aggregated"] and {s["site"] for s in r2["sites"]} == {"site_a", "site_b"}
    assert r2["failures"][0]["site"] == "site_c" and "norm" in r2["failures"][0]["reason"]
    assert all(bool(torch.isfinite(p).all()) for p in gen.autoencoder.parameters())
    # what the sites sent is in their own audit logs, the spoiled updates included
    for site in ("site_a", "site_c"):
        assert [r["round"] for r in _audit(run, site) if r["phase"] == "autoencoder"] == [1, 2]
    # the server logged each aggregated site's audit head; the logs hold every one of them
    from synthct.cli import main

    assert r1["sites"][0]["audit_chain"]
    assert main(["audit", "verify", str(run / "sites"), "--rounds", str(run / "rounds.jsonl")]) == 0


def _dp_config(smoke_config, **privacy):
    doc = smoke_config.model_dump()
    doc["federated"].update(
        {
            "ae_rounds": 0,
            "decoder_rounds": 0,
            "diffusion_rounds": 1,
            "privacy": {"enabled": True, **privacy},
        }
    )
    return type(smoke_config).model_validate(doc)


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.double().flatten() for v in state.values() if v.is_floating_point()])


def test_dp_noise_has_the_promised_scale(tmp_path, smoke_config, smoke_sites):
    # sites barely move the weights (one step at lr 1e-9; an exactly zero update makes
    # Flower's clipping divide by zero): the released change is the DP noise alone
    config = _dp_config(smoke_config, noise_multiplier=2.0, clipping_norm=0.3)
    doc = config.model_dump()
    doc["federated"]["local_steps_diffusion"] = 1
    doc["train"]["diffusion_lr"] = 1e-9
    config = type(config).model_validate(doc)
    gen = train_federated(config, smoke_sites, tmp_path / "dp")
    init = build_generator(config, seed=config.seed).unet.state_dict()
    delta = _flat(gen.unet.state_dict()) - _flat(init)
    expected = 2.0 * 0.3 / 3  # noise_multiplier * clipping_norm / sites
    assert float(delta.std()) == pytest.approx(expected, rel=0.05)
    dp = _rounds(tmp_path / "dp")[-1]["dp"]
    assert dp["epsilon"] > 0 and dp["releases"] == 1 and dp["clipping_norm"] == 0.3


def test_dp_clips_each_site_update(tmp_path, smoke_config, smoke_sites):
    config = _dp_config(smoke_config, noise_multiplier=1e-9, clipping_norm=0.05)
    doc = config.model_dump()
    doc["train"]["diffusion_lr"] = 0.05  # large steps: unclipped updates would be far above 0.05
    config = type(config).model_validate(doc)
    gen = train_federated(config, smoke_sites, tmp_path / "clip", keep_payloads=True)
    init = build_generator(config, seed=config.seed).unet.state_dict()
    raw = [
        float((_flat(_payload(tmp_path / "clip", s, "diffusion", 1)) - _flat(init)).norm())
        for s in ("site_a", "site_b", "site_c")
    ]
    assert min(raw) > 0.5  # what the sites sent was well above the bound
    released = float((_flat(gen.unet.state_dict()) - _flat(init)).norm())
    assert released <= 0.05 * (1 + 1e-4)


def test_cli_train_defaults_to_federated(tmp_path, smoke_sites):
    from synthct.cli import main
    from synthct.config import packaged_config_path

    run = tmp_path / "cli"
    smoke = str(packaged_config_path("smoke"))
    args = ["train", "--config", smoke, "--data", str(smoke_sites), "--out", str(run)]
    assert main([*args, "--max-rounds", "1"]) == 0
    state = json.loads((run / "fed_state.json").read_text())
    assert (state["phase"], state["round"]) == ("autoencoder", 1)
    assert main(args) == 2  # an existing run is not silently overwritten


class _SilentGrid:
    """Stands in for Flower's in-memory grid when no SuperNode will ever answer (its
    runtime died): messages are accepted, replies never come."""

    pull_interval = 0.05

    def __init__(self) -> None:
        self.pulls = 0

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        return []

    def get_node_ids(self):
        return [1, 2]


def test_a_dead_runtime_ends_the_server_wait_instead_of_the_round_timeout():
    stopped = threading.Event()
    grid = PromptGrid(_SilentGrid(), pull_interval=0.1, stopped=stopped)
    assert grid.get_node_ids() == [1, 2]  # everything else passes through
    assert grid.send_and_receive(["a", "b"], timeout=0.2) == []  # plain timeout: no replies
    threading.Timer(0.3, stopped.set).start()
    start = time.monotonic()
    with pytest.raises(FederatedError, match="simulation runtime stopped"):
        grid.send_and_receive(["a", "b"], timeout=600)
    assert time.monotonic() - start < 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_gpu_shares_without_a_gpu_are_refused_before_ray_waits_for_them():
    from synthct.fed.errors import FederatedError
    from synthct.fed.simulation import require_gpus

    require_gpus(0.0)
    with pytest.raises(FederatedError, match="federated.num_gpus is 0.25 but this machine has no"):
        require_gpus(0.25)


def test_secure_aggregation_under_dp_on_every_phase(tmp_path, smoke_config, smoke_sites):
    """SecAgg+ with DP in Flower's simulation: each site clips its update to the DP bound
    and the server, seeing only the masked sum, releases the equal-weight mean of the clipped
    updates (plus noise, negligible here); the round log carries each site's own norm and
    digest; one accountant composes both phases' releases into the generator's epsilon."""
    doc = smoke_config.model_dump()
    doc["federated"].update(
        {
            "ae_rounds": 1,
            "decoder_rounds": 0,
            "diffusion_rounds": 1,
            "round_timeout_s": 300.0,
            "secagg": {"enabled": True},
            "privacy": {"enabled": True, "noise_multiplier": 1e-9, "clipping_norm": 0.05},
        }
    )
    doc["train"]["diffusion_lr"] = 0.05  # unclipped updates would be far above 0.05
    config = type(smoke_config).model_validate(doc)
    run = tmp_path / "secagg"
    gen = train_federated(config, smoke_sites, run, keep_payloads=True)
    ae, _, diffusion = _rounds(run)
    assert ae["aggregated"] and ae["replies"] == 3 and ae["failures"] == []
    assert ae["secure_aggregation"] == {"clip_norm": 0.05, "unit_weight": True}
    init = build_generator(config, seed=config.seed)
    start = init.autoencoder.state_dict()
    expected = {k: v.double().clone() for k, v in start.items()}
    for s in ae["sites"]:
        kept = _payload(run, s["site"], "autoencoder", 1)
        update = {k: v.double() - start[k].double() for k, v in kept.items()}
        norm = math.sqrt(sum(float(u.pow(2).sum()) for u in update.values()))
        assert s["update_norm"] == pytest.approx(norm, rel=1e-6) and norm > 0.05  # clipped
        assert len(s["sha256_up"]) == 64 and s["audit_chain"]
        for k, u in update.items():
            expected[k] += u * (0.05 / norm) / 3  # clipped on the site, equal weights
    for k, v in gen.autoencoder.state_dict().items():
        assert torch.allclose(v.double(), expected[k], atol=1e-6), k
    assert diffusion["aggregated"] and min(s["update_norm"] for s in diffusion["sites"]) > 0.5
    released = float((_flat(gen.unet.state_dict()) - _flat(init.unet.state_dict())).norm())
    assert released <= 0.05 * 1.01
    assert ae["dp"]["releases"] == 1 and diffusion["dp"]["releases"] == 2
    assert 0 < ae["dp"]["epsilon"] < diffusion["dp"]["epsilon"]
    record = json.loads((run / "generator" / "config.json").read_text())["privacy"]
    assert record["epsilon"] == diffusion["dp"]["epsilon"] and record["releases"] == 2
    assert record["phases"] == ["autoencoder", "decoder", "diffusion"]
    assert [x for x in record["not_covered"] if "updates" in x] == []
    assert any("latent moments" in x for x in record["not_covered"])


class _LateGrid(_SilentGrid):
    """Every message is answered on the third pull."""

    def pull_messages(self, ids):
        self.pulls += 1
        if self.pulls < 3:
            return []
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)
        ]


def test_the_grid_collects_replies_at_its_own_pull_interval():
    late = _LateGrid()
    grid = PromptGrid(late, pull_interval=0.01)  # a deployed ServerApp: no runtime to watch
    replies = grid.send_and_receive(["a", "b"], timeout=60)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0", "m1"]
    assert late.pulls == 3  # it stopped pulling once every message had its reply
