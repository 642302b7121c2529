"""The two ways an experiment ends early on purpose."""


class UserError(Exception):
    """A mistake the user can fix (bad input, missing data, unwritable folder):
    one line that names the problem and the fix, shown without a traceback."""


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM after writing what it had; its run
    directory can be resumed."""

    def __init__(self, run_dir) -> None:
        super().__init__(f"interrupted: {run_dir}")
        self.run_dir = run_dir
