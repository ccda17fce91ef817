"""Errors a user can fix. The CLI prints them as one message and exits with code 2, no traceback."""

from __future__ import annotations


class FtuneError(Exception):
    """A problem with the user's input or environment (bad config, bad data row, missing model)."""


class ConfigError(FtuneError):
    """Every problem found in a config at once, one per line, each naming its key and the fix."""

    def __init__(self, problems: list[str], header: str = "invalid config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{header} ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{lines}")


class DataError(FtuneError):
    """Bad rows in a data file: each problem names the file, the row number and the field."""

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = problems
        shown = problems[:20]
        more = (total or len(problems)) - len(shown)
        lines = "\n".join(f"  - {p}" for p in shown)
        tail = f"\n  … and {more} more" if more > 0 else ""
        super().__init__(f"bad data ({total or len(problems)} problem(s)):\n{lines}{tail}")


class WriteError(FtuneError):
    """A write refused by the system (disk full, read-only, no permission); `strerror` says which."""

    def __init__(self, message: str, strerror: str):
        super().__init__(message)
        self.strerror = strerror


class RunFailed(FtuneError):
    """The run itself failed (diverged, stopped on a policy): not bad input, so exit code 1."""

    exit_code = 1


class EvalInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during the final evaluation: training is done and `artifact` is saved; only the
    evaluation was stopped (at once: nothing of it needs saving)."""

    def __init__(self, artifact, data: str | None = None):
        super().__init__(artifact, data)
        self.artifact, self.data = artifact, data


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped training at a step boundary; `checkpoint` is where it was saved."""

    def __init__(self, step: int, checkpoint):
        super().__init__(step, checkpoint)
        self.step, self.checkpoint = step, checkpoint
