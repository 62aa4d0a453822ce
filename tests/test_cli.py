from __future__ import annotations

import importlib.util
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


def test_help_version_and_argument_errors_import_no_heavy_library():
    """--help, --version and argument mistakes are answered before torch/MONAI/Flower load."""
    probe = (
        "import sys\n"
        "from synthct.cli import main\n"
        "for argv in (['--help'], ['--version'], ['--log-level', 'foo', 'demo'], ['nope']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, 2), (argv, exit.code)\n"
        "heavy = sorted(m for m in ('torch', 'monai', 'flwr') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert "invalid choice: 'FOO'" in done.stderr


BAD_VALUES = [
    (["sample", "--run", "r", "--label", "normal", "--out", "o", "--n", "0"], "--n: 0 must be"),
    (["sample", "--run", "r", "--label", "normal", "--out", "o", "--n", "-3"], "--n: -3 must"),
    (["sample", "--run", "r", "--label", "normal", "--out", "o", "--steps", "0"], "--steps: 0"),
    (["sample", "--run", "r", "--label", "x", "--out", "o", "--guidance", "-1"], "--guidance"),
    (["sample", "--run", "r", "--label", "x", "--out", "o", "--guidance", "nan"], "finite"),
    (["generate", "--run", "r", "--reference", "m", "--out", "o", "--batch-size", "0"], "batch"),
    (["generate", "--run", "r", "--reference", "m", "--out", "o", "--steps", "2.5"], "whole"),
    (["train", "--budget-min", "-1"], "--budget-min"),
    (
        [
            "plugin",
            "train",
            "--run",
            "r",
            "--site",
            "s",
            "--data",
            "d",
            "--out",
            "o",
            "--rank",
            "0",
        ],
        "--rank",
    ),
]


@pytest.mark.parametrize(
    ("argv", "message"), BAD_VALUES, ids=lambda v: " ".join(v) if isinstance(v, list) else v
)
def test_nonsense_values_are_refused_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing half-made


def test_outputs_of_the_wrong_kind_and_missing_inputs_get_one_line(tmp_path, capsys):
    """Checked before any work: a gate report aimed at a folder, phantoms aimed at a file, a
    registry that is not there; exit 2, one line naming the path, nothing written."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (
            ["gate", "--cohort", "c", "--train", "m", "--holdout", "m", "--out", str(tmp_path)],
            "is a folder",
        ),
        (["phantoms", "--out", str(a_file)], "is not a folder"),
        (["plugin", "list", str(tmp_path / "no_registry")], "no plugin registry"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("synthct: error: ") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
