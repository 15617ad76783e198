"""How the command-line scripts fail on bad input: one `parser.error` line on stderr and exit status 2."""
import pytest


def cli_error(capsys, main, argv):
    """Run main(argv), expect the parser.error exit; return the error message (the text after 'error: ')."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and ": error: " in lines[-1], lines
    return lines[-1].split(": error: ", 1)[1]
