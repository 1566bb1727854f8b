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
