"""No undefined names in the package, tools or dev drivers: the CUDA paths never run on a machine without a GPU, so
a name missing in them (a lost import) shows only here before a GPU run."""
from pathlib import Path

import pytest

pyflakes_api = pytest.importorskip("pyflakes.api")
from pyflakes import messages, reporter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class _Collect(reporter.Reporter):
    def __init__(self):
        self.found = []

    def flake(self, message):
        if isinstance(message, (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)):
            self.found.append(str(message))

    def syntaxError(self, filename, msg, lineno, offset, text):
        self.found.append(f"{filename}:{lineno}: {msg}")

    def unexpectedError(self, filename, msg):
        self.found.append(f"{filename}: {msg}")


@pytest.mark.parametrize("folder", ["engine", "tools", "dev"])
def test_every_name_used_is_defined(folder):
    collect = _Collect()
    pyflakes_api.checkRecursive([str(ROOT / folder)], collect)
    assert collect.found == []
