"""vitfood: fine-tune Hugging Face image classifiers with a plain PyTorch loop."""

__version__ = "0.1.0"


def quiet_ctrl_c():
    """For `python -m vitfood.<command>`, called before its heavy imports: a Ctrl-C while they run exits with
    one line and status 130, not a traceback (common.run_main then puts Python's own handler back)."""
    import os
    import signal
    import sys

    def interrupted(signum, frame):
        sys.stderr.write("error: interrupted (Ctrl-C)\n")
        os._exit(130)

    signal.signal(signal.SIGINT, interrupted)
