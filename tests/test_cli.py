from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from synthct.cli import build_parser, main
from synthct.data.manifest import read_manifest


def test_help_lists_commands():
    text = build_parser().format_help()
    for command in ("demo", "phantoms", "data"):
        assert command in text


def test_console_script_installed():
    script = Path(sys.executable).parent / "synthct"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "phantoms" in out.stdout


def test_phantoms_command_deterministic(tmp_path):
    from synthct.config import packaged_config_path

    smoke = str(packaged_config_path("smoke"))
    assert main(["phantoms", "--config", smoke, "--out", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert main(["phantoms", "--config", smoke, "--out", str(tmp_path / "b"), "--seed", "3"]) == 0
    rows_a = read_manifest(tmp_path / "a" / "manifest.csv")
    rows_b = read_manifest(tmp_path / "b" / "manifest.csv")
    assert [(r.path, r.label, r.split) for r in rows_a] == [
        (r.path, r.label, r.split) for r in rows_b
    ]
    first = rows_a[0].path
    assert (tmp_path / "a" / first).read_bytes() != b""
    import nibabel as nib

    a = nib.load(str(tmp_path / "a" / first)).get_fdata()
    b = nib.load(str(tmp_path / "b" / first)).get_fdata()
    assert (a == b).all()


def test_bad_config_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("labels: {classes: [a, b]}\ndata: {sites: [{name: x, noise_hu: -1}]}\n")
    assert main(["phantoms", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "data.sites[0].noise_hu = -1" in err and str(bad) in err


def test_namespaced_packages_only():
    """`fed/` and `eval/` are importable only as synthct.fed / synthct.eval, never top-level."""
    assert importlib.util.find_spec("synthct.eval") is not None
    assert importlib.util.find_spec("synthct.fed") is not None
    assert importlib.util.find_spec("fed") is None
    assert importlib.util.find_spec("eval") is None


def test_help_version_and_argument_errors_import_no_heavy_library(tmp_path):
    """--help, --version, argument mistakes and input paths that are not there are answered
    before torch/MONAI/Flower load."""
    probe = (
        "import sys\n"
        "from synthct.cli import main\n"
        "for argv in (['--help'], ['--version'], ['--log-level', 'foo', 'demo'], ['nope']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, 2), (argv, exit.code)\n"
        "for line in ('downstream --data no.csv --out d', 'reference --data no.csv --out r',\n"
        "             'generate --generator nowhere --data no.csv --out c', 'plugin list nowhere',\n"
        "             'gate --cohort nowhere', 'plugin train --generator nowhere --site s "
        "--data no.csv --out p'):\n"
        "    assert main(line.split()) == 2, line\n"
        "heavy = sorted(m for m in ('torch', 'monai', 'flwr') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert "invalid choice: 'FOO'" in done.stderr


# Ordinary mistakes, each through the real CLI: (command line, exit code, what the message
# says). {tmp} is a folder holding only the files `mistakes` makes.
MISTAKES = [
    # numbers are range-checked while parsing
    ("sample --generator g --label normal --out o --n 0", 2, "--n: 0 must be at least 1"),
    ("sample --generator g --label normal --out o --n -3", 2, "--n: -3 must"),
    ("sample --generator g --label normal --out o --steps 0", 2, "--steps: 0 must"),
    ("sample --generator g --label x --out o --guidance -1", 2, "--guidance: -1"),
    ("sample --generator g --label x --out o --guidance nan", 2, "finite"),
    ("generate --generator g --data m --out o --batch-size 0", 2, "--batch-size: 0"),
    ("generate --generator g --data m --out o --steps 2.5", 2, "'2.5' is not a whole number"),
    ("train --out o --budget-min -1", 2, "--budget-min"),
    ("train --out o --central --max-rounds 2", 2, "--max-rounds is a federated option"),
    ("plugin train --generator g --site s --data d --out o --rank 0", 2, "--rank: 0"),
    ("--log-level foo demo", 2, "invalid choice: 'FOO'"),
    ("sample --label normal --out o", 2, "required: --generator"),
    ("gate --data m", 2, "required: --cohort"),
    ("downstream --data {tmp}/a_file --out o --seeds 0,x", 2, "--seeds '0,x'"),
    # outputs of the wrong kind and missing inputs, refused before any work
    ("phantoms --out {tmp}/a_file", 2, "--out {tmp}/a_file: exists and is not a folder"),
    ("gate --cohort c --data m --out {tmp}/a_file", 2, "is not a folder"),
    ("plugin list {tmp}/no_registry", 2, "no plugin registry"),
    ("data check {tmp}/a_folder", 2, "is a folder; give the manifest CSV inside it"),
    ("data check {tmp}/latin1.csv", 2, "not UTF-8 text"),
    ("reference --data {tmp}/missing.csv --out {tmp}/r", 2, "missing.csv: manifest not found"),
    ("downstream --data {tmp}/missing.csv --out {tmp}/d", 2, "missing.csv: manifest not found"),
    ("gate --cohort {tmp}/unfinished --data {tmp}/a_file", 2, "2 of 5 planned cases written"),
    (
        "gate --cohort {tmp}/nowhere --data {tmp}/a_file",
        2,
        "--cohort {tmp}/nowhere: no such cohort",
    ),
    (
        "generate --generator {tmp}/a_folder --data {tmp}/a_file --out {tmp}/c",
        2,
        "no generator here",
    ),
    ("generate --generator pretrained --data {tmp}/a_folder --out {tmp}/c", 2, "is a folder; give"),
    (
        "plugin train --generator {tmp}/nowhere --site s --data {tmp}/a_file --out {tmp}/p",
        2,
        "nowhere/generator/config.json: no generator here",
    ),
    ("sample --generator pretrained --label tumour --out {tmp}/o", 2, "unknown class 'tumour'"),
    (
        "sample --generator pretrained --label nodule --site nowhere --out {tmp}/o",
        2,
        "--site nowhere: this generator is not site-conditioned",
    ),
    ("sample --generator pretrained --label nodule --device cuda --out {tmp}/o", 2, "no CUDA"),
    ("gate --cohort {tmp}/unfinished --data {tmp}/a_file --device cuda", 2, "no CUDA"),
    ("gate --cohort {tmp}/unfinished --data {tmp}/a_file --federated --device cuda", 2, "on CPU"),
    (
        "plugin train --generator pretrained --site s --data {tmp}/a_file --out {tmp}/p --device cuda",
        2,
        "no CUDA",
    ),
    ("reference --data {tmp}/latin1.csv --out {tmp}/r --device cuda", 2, "no CUDA"),
    ("reference --data {tmp}/latin1.csv --out {tmp}/r --federated --device cuda", 2, "on CPU"),
    ("downstream --data {tmp}/a_file --out {tmp}/d --device cuda", 2, "no CUDA"),
    ("demo --out {tmp}/demo --device cuda", 2, "no CUDA"),
    ("downstream --data {tmp}/a_file --out {tmp}/d --federated --device cuda", 2, "on CPU"),
    ("config validate nosuch", 2, "nosuch: config file not found"),
    ("config show --set train.batch_size=0", 2, "train.batch_size = 0"),
    ("phantoms --config smoke --set data.nope=1 --out {tmp}/p", 2, "data.nope = 1: unknown key"),
    ("keys {tmp} --name taken", 2, "taken.key: a key of that name exists"),
    ("audit verify {tmp}/nothing", 2, "no audit log"),
]


@pytest.fixture()
def mistakes(tmp_path: Path) -> Path:
    """A folder with the inputs the mistakes need: a file, a folder, a Latin-1 CSV, a key
    that exists, an unfinished cohort (2 of 5 planned cases)."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "latin1.csv").write_bytes(b"path,label,site,split\nv\xe9.nii.gz,normal,a,train\n")
    (tmp_path / "taken.key").write_text("x")
    cohort = tmp_path / "unfinished"
    cohort.mkdir()
    plan = [[f"a-nodule-{i:04d}", "nodule", "a"] for i in range(5)]
    (cohort / "cohort.json").write_text(json.dumps({"plan": plan}))
    (cohort / "manifest.partial.csv").write_text(
        "path,label,site,split\ncases/a/nodule/a-nodule-0000.nii.gz,nodule,a,train\n"
        "cases/a/nodule/a-nodule-0001.nii.gz,nodule,a,train\n"
    )
    return tmp_path


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("line", "code", "message"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_every_mistake_gets_one_clear_answer_and_leaves_nothing(
    line, code, message, mistakes, capsys, monkeypatch
):
    """Exit code, a message naming the argument or file, no traceback, and not one file
    written or changed (relative outputs would land in the working folder, also checked)."""
    if "cuda" in line:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    monkeypatch.chdir(mistakes)
    before = _tree(mistakes)
    argv = line.replace("{tmp}", str(mistakes)).split()
    try:
        got = main(argv)
    except SystemExit as exit:  # argparse's own errors
        got = exit.code
    out, err = capsys.readouterr()
    assert got == code, (out, err)
    assert message.replace("{tmp}", str(mistakes)) in out + err
    assert "Traceback" not in out + err
    if not line.startswith("data check"):  # data check lists problems on stdout
        errors = [x for x in err.splitlines() if "error:" in x]
        assert len(errors) == 1 and errors[0].startswith("synthct"), err
    assert _tree(mistakes) == before


OLD_NAMES = [
    ("sample --run R --label x --out o", "generator", "--run is now --generator"),
    ("generate --run R --reference M --out o", "data", "--reference is now --data"),
    ("plugin add reg p --run R", "generator", "--run is now --generator"),
    ("gate --cohort c --manifest M", "data", "--manifest is now --data"),
    ("gate --cohort c --train M --holdout H", "train_manifest", "--train is now --data"),
    ("gate --cohort c --reference M", "reference_model", "--reference is now --reference-model"),
    ("reference --manifest M --out o", "data", "--manifest is now --data"),
    ("downstream --real M --out o", "data", "--real is now --data"),
]


@pytest.mark.parametrize(("line", "dest", "notice"), OLD_NAMES, ids=[o[0] for o in OLD_NAMES])
def test_old_option_names_still_work_with_a_notice(line, dest, notice, capsys):
    args = build_parser().parse_args(line.split())
    assert getattr(args, dest) in ("R", "M")
    assert notice in capsys.readouterr().err


def _parsers(parser: argparse.ArgumentParser, name: str = "synthct"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def test_every_command_teaches_and_every_option_is_explained():
    """Each runnable command has a description, an example and its exit codes; every option a
    help line (with its default when it has one)."""
    runnable = 0
    for name, parser in _parsers(build_parser()):
        if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            assert parser.description, name
            continue
        runnable += 1
        assert parser.description and parser.epilog, name
        assert "example:\n  synthct " in parser.epilog and "exit codes:" in parser.epilog, name
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:  # an old name, kept for one release
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help line"
    assert runnable >= 19
    text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "(default: 8)" in text and "(default: nifti)" in text


def test_a_config_that_does_not_fit_the_data_is_named(smoke_sites, capsys):
    """Smoke phantoms (16^3 at ~21 mm) judged under the demo config (11 mm): data check still
    passes, with a warning saying the volumes are coarser than the config's grid."""
    assert main(["data", "check", str(smoke_sites), "--config", "demo"]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "coarser voxels than the config's 11x11x10 mm" in out
    assert main(["data", "check", str(smoke_sites), "--config", "smoke"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_python_dash_m_runs_the_same_command_line(tmp_path):
    """``python -m synthct.cli`` (what bench/demo.py runs) is the ``synthct`` command."""
    done = subprocess.run(
        [sys.executable, "-m", "synthct.cli", "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("synthct ")
    bad = subprocess.run(
        [sys.executable, "-m", "synthct.cli", "nope"], capture_output=True, text=True, cwd=tmp_path
    )
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr
