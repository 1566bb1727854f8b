"""Everything a notebook does before its lesson starts, in one call and at most three printed lines.

The notebooks' single setup cell (written by ``helpers.colab.setup_cell_source``) finds or fetches the course code,
then calls ``start`` (a notebook that loads a model) or ``start_lesson`` (notebook 00, which loads none). What they
print is short on purpose: the lesson, not the setup, should open the notebook. ``environment.print_versions()``
prints the long version, for a bug report.
"""

from __future__ import annotations

from pathlib import Path

from helpers import colab  # standard library only: nothing else may be imported before Colab's installs

RUNNING_ON = "Running on:"
"""How the line about this machine starts. Its text differs from machine to machine (versions, CPU, GPU), so the
notebook tests replace that one line (tests/nbval_sanitize.cfg) and compare the rest of the cell."""


def start(root: str | Path, requested_profile: str | None = None, extras_for: str | None = None):
    """Install what Colab lacks (elsewhere nothing), quiet the known harmless messages, choose, check and announce
    the profile (``requested_profile``: the notebook's PROFILE, None for automatic), seed everything, and return the
    profile. Prints the profile, this machine and what was quieted, one line each (a rehearsal adds its own lines).

    ``extras_for``: a notebook of ``colab.NOTEBOOK_EXTRAS`` (its name without ``.ipynb``), whose extra libraries
    are installed too on Colab, before anything is trained. Raises ValueError for a name that has none.
    """
    if extras_for is not None and extras_for not in colab.NOTEBOOK_EXTRAS:
        raise ValueError(f"no extra libraries are listed for {extras_for!r}; extras_for takes one of "
                         f"{', '.join(sorted(colab.NOTEBOOK_EXTRAS))} (helpers/colab.py, NOTEBOOK_EXTRAS), or None")
    colab.install_on_colab(root)  # on Colab only; it prints what it installed
    if extras_for is not None:
        colab.install_extras_on_colab(root, colab.NOTEBOOK_EXTRAS[extras_for])  # on Colab only
    from helpers import environment, profiles  # torch and the Hugging Face libraries load from here on

    quieted = environment.quiet_known_noise(verbose=False)  # before anything imports bitsandbytes
    hardware = environment.detect_hardware()
    profile = profiles.choose_profile(requested_profile, hardware=hardware)
    print(f"{RUNNING_ON} {hardware.describe()}; {environment.versions_line()}")
    print(f"Quieted known, harmless messages ({', '.join(quieted)}): "
          "environment.describe_known_noise() says what each is.")
    environment.seed_everything(0)
    return profile


def start_lesson() -> None:
    """The setup of a lesson that loads no model (notebook 00): one line of versions, and the seed. Colab already
    has everything such a lesson imports, so nothing is installed."""
    from helpers import environment

    print(f"{RUNNING_ON} {environment.versions_line(environment.LESSON_PACKAGES)}")
    environment.seed_everything(0)
