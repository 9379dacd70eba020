import subprocess
import sys

import medjdt
from medjdt.cli import main


def test_version_flag(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert capsys.readouterr().out.strip() == f"medjdt {medjdt.__version__}"


def test_console_script_version():
    out = subprocess.run([sys.executable, "-m", "medjdt.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("medjdt ")
