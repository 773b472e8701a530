"""The command line run in-process, for the tests: its exit status and output, and the one-line error every refusal must be;
and a child process that gets its signals as at a terminal."""
import signal
from cifar_kit.cli import main


def run_cli(capsys, *argv)->tuple[int, str, str]:
    "`cifar-kit argv` in-process: (exit status, stdout, stderr)"
    try: code = main([str(a) for a in argv])
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(capsys, *argv, contains:str)->str:
    "Run `cifar-kit argv`, which must refuse with status 2 and one line holding `contains` (argparse's usage line may come first)"
    code, _, err = run_cli(capsys, *argv)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and lines and contains in lines[-1], err
    assert len(lines) == 1 or lines[0].startswith('usage:'), err
    assert 'Traceback' not in err, err
    return lines[-1]


def as_at_a_terminal():
    "`preexec_fn` for a child: the default dispositions (a suite run in the background or under nohup passes SIGINT or SIGHUP on ignored)"
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP): signal.signal(s, signal.SIG_DFL)
