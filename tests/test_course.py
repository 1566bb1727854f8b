"""helpers.course: the one call of a notebook's setup cell, and what it prints."""

import re
import sys
from pathlib import Path

import pytest

from helpers import course, environment, profiles


def test_start_prints_three_lines_and_returns_the_profile(monkeypatch, capsys, tmp_path):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.delenv(profiles.PROFILE_ENV_VAR, raising=False)
    monkeypatch.delenv(environment.REHEARSAL_ENV_VAR, raising=False)
    profile = course.start(tmp_path)  # outside Colab nothing is installed (tmp_path has no requirements.txt)
    lines = capsys.readouterr().out.splitlines()
    assert profile.name == "tiny" and len(lines) == 3
    assert lines[0].startswith("Profile tiny: ")
    assert re.fullmatch(r"Running on: CPU only \(no CUDA GPU\); python 3\.\d+\.\d+, torch [^,]+, transformers .*"
                        r"; PyTorch CPU kernels \w+, \d+ threads?", lines[1])
    assert lines[2].startswith("Quieted known, harmless messages (progress bars, ")


def test_a_wrong_profile_stops_with_the_choices(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    with pytest.raises(ValueError, match="Unknown profile 'llama-4'. Choose one of: tiny, llama-3.2-3b, llama-3.1-8b"):
        course.start(tmp_path, "llama-4")


def test_the_machine_line_is_the_one_the_notebook_tests_replace():
    config = (Path(__file__).parent / "nbval_sanitize.cfg").read_text()
    assert f"regex: {course.RUNNING_ON} [^\\n]*" in config


def test_start_lesson_prints_one_line(capsys):
    course.start_lesson()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("Running on: python ") and "matplotlib " in out


def test_extras_are_named_by_notebook_and_a_wrong_name_stops_before_anything_is_installed(monkeypatch, tmp_path):
    from helpers import colab

    installs = []
    monkeypatch.setattr(colab, "install_on_colab", lambda root: installs.append(root))
    with pytest.raises(ValueError, match="no extra libraries are listed for '06_qlora'; extras_for takes one of "
                                         "06_qlora_finetune, 07_beyond_bitsandbytes"):
        course.start(tmp_path, extras_for="06_qlora")
    assert installs == []
    requirements = (Path(__file__).parents[1] / "requirements.txt").read_text()
    pinned = set(colab.read_pins(requirements)) | set(colab.read_no_deps_pins(requirements))
    for stem, libraries in colab.NOTEBOOK_EXTRAS.items():  # every extra is an exact pin, and only those notebooks ask
        assert set(libraries) <= pinned, stem
        assert f'extras_for="{stem}"' in colab.setup_cell_source(notebook_name=f"{stem}.ipynb")
    assert "extras_for" not in colab.setup_cell_source(notebook_name="03_nf4.ipynb")
