"""User-facing errors: one line that names the problem and the fix, then a non-zero exit.

Raise `UserError` for anything the user can correct (a flag, a path, a data set, a model pair).
`finetuning.py` and the other entry points catch it, print `error: <message>` and exit with code 2.
Bugs stay ordinary exceptions with their traceback.
"""


class UserError(Exception):
    """A problem with the user's input; its message is shown as a single line."""

    exit_code = 2
    label = "error"  # what the entry point prints before the message

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class UserErrors(UserError):
    """Several problems found by one check of the inputs: each is printed as its own `error: ...` line."""

    def __init__(self, messages: list[str]):
        self.messages = [" ".join(str(m).split()) for m in messages]
        super().__init__("; ".join(self.messages))


class RunInterrupted(UserError):
    """SIGTERM / SIGINT stopped the run after saving a resumable checkpoint: exit 128 + the signal's number."""

    label = "interrupted"

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number
