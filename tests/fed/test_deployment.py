"""A real Flower deployment on loopback: one SuperLink and one SuperNode per site, each a
separate process, TLS on every connection and SuperNode authentication (only registered site
keys may connect). Each site sees only its own manifest. ``flwr run`` ships the code-free app
directory; the generator run must complete with every site's result in every round, then the
same app trains the federated reference, gates a cohort, trains the downstream classifiers
(real-only and with each site's own copy of the cohort) and takes one site's plugin on the
trained generator (only the SuperNode that opted in sends one), on the same SuperNodes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from synthct.artifacts import read_json
from synthct.checkpoint import load_generator
from synthct.config import load_config, packaged_config_path
from synthct.data.manifest import write_site_manifest
from synthct.eval.negatives import fresh_real_cohort
from synthct.fed.deployment import write_flower_app, write_supernode_keys, write_tls_certificates
from synthct.reference import load_reference
from synthct.signing import make_signing_key, verify_document

pytestmark = pytest.mark.slow

# Two hospitals (one without the rare class, with its own label names): every message starts a
# ClientApp process per site (~9 s of imports), so a third site adds a third of the test's time
# and nothing the simulation tests do not already cover with three or four sites.
SITES = ("site_a", "site_b")
CONTRIBUTOR = "site_b"  # the one SuperNode that opts in to sending a plugin


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HOME": str(home),
            "FLWR_HOME": str(home / ".flwr"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # flwr-serverapp / flwr-clientapp and synthct come from this venv
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return env


class _Processes:
    def __init__(self, logs: Path) -> None:
        self.logs, self.procs = logs, []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append((proc, log))
        return proc

    def stop(self) -> None:
        for proc, _ in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        for proc, log in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            log.close()
        for proc, _ in self.procs:  # descendants (flwr-clientapp, superexec) too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text()[-3000:] for p in sorted(self.logs.glob("*.log"))
        )


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def test_superlink_and_supernodes_with_tls_and_node_auth(tmp_path, smoke_sites):
    home = tmp_path / "home"
    (home / ".flwr").mkdir(parents=True)
    env = _env(home)
    certs = write_tls_certificates(tmp_path / "certs", ["127.0.0.1", "localhost"])
    superlink_port = _free_port()
    (home / ".flwr" / "config.toml").write_text(
        "[superlink]\n"
        'default = "local"\n\n'
        "[superlink.local]\n"
        f'address = "127.0.0.1:{superlink_port}"\n'
        f'root-certificates = "{certs["ca.crt"]}"\n'
    )
    config = yaml.safe_load(packaged_config_path("smoke").read_text())
    config["federated"].update(
        {
            "ae_rounds": 1,
            "diffusion_rounds": 1,
            "connect_timeout_s": 120,
            "round_timeout_s": 240,
            "min_class_cases": 1,  # the smoke sites hold 2-4 cases per class
            # every message starts a ClientApp process (~10 s of imports on 2 cores): one round
            # per task shows each task deploys; the simulation tests cover longer runs
            "reference_rounds": 1,
        }
    )
    config["downstream"].update({"seeds": [0], "rounds": 1})
    config["data"]["sites"] = [s for s in config["data"]["sites"] if s["name"] in SITES]
    config_path = tmp_path / "fed.yaml"
    config_path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    app_dir = tmp_path / "app"
    write_flower_app(app_dir, config=str(config_path), out=str(run_dir))
    reference_dir, gate_dir, down_dir = tmp_path / "reference", tmp_path / "gate", tmp_path / "down"
    smoke = load_config(config_path)
    counts = dict.fromkeys(smoke.labels.classes, 2)
    cohort = fresh_real_cohort(smoke, counts, tmp_path / "cohort", seed=5, sites=SITES)
    gate_key, gate_pub = make_signing_key(tmp_path / "keys", "gate")

    procs = _Processes(tmp_path / "logs")
    try:
        procs.start(
            "superlink",
            [
                "flower-superlink",
                "--ssl-ca-certfile", str(certs["ca.crt"]),
                "--ssl-certfile", str(certs["server.pem"]),
                "--ssl-keyfile", str(certs["server.key"]),
                "--host", "127.0.0.1",
                "--port", str(superlink_port),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
            ],
            env,
        )  # fmt: skip
        _wait_port(superlink_port)
        for site in SITES:
            private, public = write_supernode_keys(tmp_path / "keys", site)
            reg = subprocess.run(
                ["flwr", "supernode", "register", str(public), "local"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                cwd=tmp_path,
            )
            assert reg.returncode == 0, reg.stdout + reg.stderr
            manifest = write_site_manifest(smoke_sites, site, tmp_path / site / "manifest.csv")
            copy = shutil.copytree(cohort.parent, tmp_path / site / "cohort")  # the site's own
            node_config = (
                f"site='{site}' manifest='{manifest}' audit-dir='{tmp_path / site / 'audit'}' "
                f"cohort='{copy / 'manifest.csv'}' generator='{run_dir / 'generator'}'"
                + (" contribute-plugins=true" if site == CONTRIBUTOR else "")
            )
            procs.start(
                site,
                [
                    "flower-supernode",
                    "--root-certificates", str(certs["ca.crt"]),
                    "--superlink", f"127.0.0.1:{superlink_port}",
                    "--host", "127.0.0.1",
                    "--port", str(_free_port()),
                    "--auth-supernode-private-key", str(private),
                    "--node-config", node_config,
                ],
                env,
            )  # fmt: skip

        def flwr_run(done: Callable[[], bool], what: str, run_config: str | None = None) -> None:
            cmd = ["flwr", "run", str(app_dir), "local", "--stream"]
            if run_config:
                cmd += ["--run-config", run_config]
            result = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
            )
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not done():
                time.sleep(2)
            if not done():
                pytest.fail(f"{what} did not finish\n" + procs.tail())

        state = run_dir / "fed_state.json"
        flwr_run(
            lambda: state.is_file() and json.loads(state.read_text())["phase"] == "done",
            "federated generator run",
        )
        # the same app, the same SuperNodes: the reference, then the gate on a cohort
        flwr_run(
            lambda: (reference_dir / "reference.json").is_file(),
            "federated reference",
            f"task='reference' out='{reference_dir}'",
        )
        flwr_run(
            lambda: (gate_dir / "gate.json").is_file(),
            "federated gate",
            f"task='gate' cohort='{cohort}' reference='{reference_dir}' out='{gate_dir}' "
            f"bootstrap=20 sign-key='{gate_key}'",
        )
        # and the downstream classifiers, real-only and with the cohort each site holds a copy
        # of (the gate's verdict may be a fail on these few smoke cases: forced, and said so)
        flwr_run(
            lambda: (down_dir / "results.json").is_file(),
            "federated downstream",
            f"task='downstream' cohort='{cohort.parent}' gate='{gate_dir / 'gate.json'}' "
            f"force-ungated=true trusted-keys='{gate_pub}' out='{down_dir}'",
        )
        # a site contributes a plugin on the trained generator, through the same SuperNodes
        registry = tmp_path / "registry"
        flwr_run(
            lambda: (registry / "registry.json").is_file(),
            "plugin contribution",
            f"task='plugin' site='{CONTRIBUTOR}' generator='{run_dir / 'generator'}' "
            f"registry='{registry}' steps=2 reference='{reference_dir}' gate-cases=2 "
            "bootstrap=20",
        )
    finally:
        procs.stop()

    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    train_rounds = [r for r in rounds if r["phase"] != "scale"]
    assert [(r["phase"], r["round"]) for r in train_rounds] == [
        ("autoencoder", 1),
        ("decoder", 1),
        ("diffusion", 1),
    ]
    for r in train_rounds:
        assert r["replies"] == r["sent"] == len(SITES) and r["failures"] == [], r
        assert {s["site"] for s in r["sites"]} == set(SITES)
    assert min(load_generator(run_dir / "generator").latent_norm.scale) > 0
    reference = load_reference(reference_dir, vocabulary_hash=smoke.labels.vocabulary_hash)
    assert reference.info["trained"] == "federated" and reference.info["sites"] == len(SITES)
    gate = json.loads((gate_dir / "gate.json").read_text())
    assert gate["real"]["mode"] == "federated" and gate["real"]["sites"] == list(SITES)
    assert gate["verdict"] in ("pass", "fail") and gate["metrics"]
    # the deployed gate signed its verdict with the key it was given
    assert verify_document(gate, [gate_pub], what="deployed gate")
    for site in SITES:  # each site's own audit log, in its own folder: every task's releases
        audit = (tmp_path / site / "audit" / "audit.jsonl").read_text().splitlines()
        phases = [json.loads(line)["phase"] for line in audit]
        assert phases[:4] == ["autoencoder", "decoder", "scale", "diffusion"], phases
        n_ref = smoke.federated.reference_rounds
        assert phases[4 : 7 + n_ref] == ["reference"] * n_ref + [
            "reference-holdout",
            "gate-summary",
            "gate-evidence",
        ], phases
        downstream = phases[7 + n_ref :]  # two arms: rounds of weights and holdout counts
        # only the contributor sent a plugin, and only it scored its cohort (the gate)
        plugin = ["plugin", "gate-summary", "gate-evidence"] if site == CONTRIBUTOR else []
        assert downstream[len(downstream) - len(plugin) :] == plugin
        downstream = downstream[: len(downstream) - len(plugin)]
        assert downstream.count("downstream-test") == 2 and "downstream" in downstream
        assert set(downstream) == {"downstream", "downstream-holdout", "downstream-test"}
    results = json.loads((down_dir / "results.json").read_text())
    assert results["mode"] == "federated (deployment)"
    assert results["ungated"] == (gate["verdict"] != "pass")
    if gate["verdict"] == "pass":  # downstream checked the signature against the trusted key
        assert results["gate"]["signed_by"].endswith("gate.pub")
    else:  # refused for the verdict, not for the signature
        assert "signature" not in results["gate"]["refusal"]
    for arm in ("real", "real+synthetic"):
        (run,) = results["arms"][arm]["runs"]
        assert set(run["per_site"]) == set(SITES)
    synthetic = results["arms"]["real+synthetic"]["runs"][0]["train_cases"]
    assert synthetic["synthetic"] == sum(counts.values()) and synthetic["real"] > 0
    assert "balanced_accuracy" in results["effect"]
    assert results["utility"]["per_seed"][0]["seed"] == 0  # judged on holdout, as in simulation
    # judged by the federated gate before the registry took it or refused it, with its numbers
    (event,) = read_json(registry / "registry.json")["history"]
    assert event["site"] == CONTRIBUTOR and event["by"].startswith("flower node ")
    decision = (
        event.get("decision")
        or read_json(registry / "registry.json")["plugins"][event["plugin"]]["acceptance"]
    )
    assert decision["gated"] and decision["judged_by"] == [CONTRIBUTOR]
    # a one-round generator makes noise: its cohort fails, the plugin is refused and recorded
    assert event["event"] == "refused" and not decision["accepted"] and decision["failed_rules"]
