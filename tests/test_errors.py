"""One base class for user-facing errors: the CLI answers them all with one line and exit 2."""

from __future__ import annotations

import pytest

from synthct.checkpoint import CheckpointError
from synthct.cohort import CohortError
from synthct.config import ConfigError
from synthct.data.manifest import ManifestError
from synthct.data.volume_io import VolumeError
from synthct.errors import SynthctError
from synthct.eval.gate import GateError
from synthct.fed.errors import FederatedError, SiteError
from synthct.plugins.adapter import PluginError

USER_ERRORS = [
    CheckpointError,
    CohortError,
    ConfigError,
    ManifestError,
    VolumeError,
    GateError,
    FederatedError,
    SiteError,
    PluginError,
]


@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda e: e.__name__)
def test_every_user_error_is_a_synthct_error_and_keeps_its_old_base(error):
    assert issubclass(error, SynthctError)
    # callers that caught ValueError / RuntimeError before still do
    assert issubclass(error, (ValueError, RuntimeError))


@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda e: e.__name__)
def test_the_cli_answers_each_with_one_line_and_exit_2(error, monkeypatch, capsys):
    from synthct import cli
    from synthct.cli import data

    def fail(args):
        raise error("/data/x.nii.gz: wrong shape")

    monkeypatch.setattr(data, "cmd_data_check", fail)
    assert cli.main(["data", "check", "m.csv"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == "synthct: error: /data/x.nii.gz: wrong shape\n"
