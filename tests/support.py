"""Small helpers shared by several test files (not tests themselves)."""

import urllib.request


def pypi_reachable(package: str = "safetensors") -> bool:
    """Whether PyPI's simple index answers for ``package`` within 5 s (tests that install from it skip otherwise)."""
    try:
        with urllib.request.urlopen(f"https://pypi.org/simple/{package}/", timeout=5):
            return True
    except OSError:
        return False
