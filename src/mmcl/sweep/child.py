"""``python -m mmcl.sweep.child run ...``: one run of a sweep, exactly ``mmcl run ...`` except that SIGTERM
(a SLURM job cancelled or preempted, a launcher stopping) stops it as Ctrl-C does: the finished stages and
evaluations stay, the run dir's lock is released, and running the same command again resumes."""

from __future__ import annotations

import signal
import sys


def _stop(signum: int, frame: object) -> None:
    """The first SIGINT or SIGTERM stops the run; later ones (a launcher and a terminal both signalling) are
    ignored, so that they cannot cut its clean-up short. The launcher kills it if it does not end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)  # also when started with SIGINT ignored
    try:
        from mmcl.cli import main as cli_main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
