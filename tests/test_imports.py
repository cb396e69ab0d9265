"""Heavy optional parts load only where they are used (STYLE: dependencies point one way)."""

import subprocess
import sys


def test_importing_tape_and_its_cli_loads_no_heavy_optional_library():
    code = (
        "import sys, tape, tape.cli\n"
        # scipy.signal alone took most of a second of every command's start-up
        "heavy = ('matplotlib', 'openevolve', 'optuna', 'torch', 'scipy.signal')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == ""
