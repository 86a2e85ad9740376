"""Named errors raised inside rloopd; only the CLI maps them to a message and an exit code."""

import re

# What would break a message into lines or not print: control characters (tab aside), line and paragraph
# separators, and lone surrogates (an argument that was not UTF-8).
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def one_line(text: str) -> str:
    """`text` with those characters escaped as Python writes them (`\\n`, `\\x00`, `\\udcff`), so that a
    value a message quotes (a path, a key, an argument) can never break it into lines. Idempotent."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


class RloopdError(Exception):
    """Base of every error the CLI turns into one line and exit code `exit_code`."""

    exit_code = 2

    def __str__(self) -> str:
        return one_line(super().__str__())


class HomeError(RloopdError):
    """The home directory is missing, unwritable, or holds something that is not an rloopd home."""


class HomeBusy(RloopdError):
    """Another process (a daemon, or a foreground run) is the home's writer."""


class DaemonError(RloopdError):
    """The daemon refused a request or could not be reached."""


class LogCorrupt(RloopdError):
    """events.db is not an rloopd event log (or not a database at all)."""


class StaleRun(RloopdError):
    """An append expected a stream position that another writer has already taken."""


class StreamNotFound(RloopdError):
    """No stream (run id, run name, batch:<id>, home) matches what was asked for."""


class RunNotFound(StreamNotFound):
    """No run matches the given id, id prefix or name."""


class StepNotFound(RloopdError):
    """A step that the run has not started."""


class PayloadInvalid(RloopdError):
    """An event payload does not validate against its model."""


class UnknownEventType(RloopdError):
    """An event type (or payload version) that this version of rloopd does not know."""


class BlobMissing(RloopdError):
    """An event names a blob that is not in the store."""


class BlobCorrupt(RloopdError):
    """A blob's bytes no longer hash to its name."""


class AuditFailed(RloopdError):
    """A hash chain, a stored payload or a blob does not verify."""

    exit_code = 1


class LabConfigError(RloopdError):
    """rloop.toml (or a file it names) is malformed or incomplete."""


class ArchiveUnreadable(RloopdError):
    """An archive file that cannot be taken in: unreadable, truncated, not an rloopd archive, or newer."""


class ArchiveInvalid(RloopdError):
    """An archive whose contents do not verify: an altered event, blob, commit or digest."""

    exit_code = 1


class ImportConflict(RloopdError):
    """An archive's stream differs from the stream of the same id already in the home."""


class ConfigError(RloopdError):
    """rloopd.toml (the daemon's settings) or a `rloopd serve` flag is malformed, unknown or out of range."""


class ExecutorError(RloopdError):
    """`executor = "ray"` cannot work: Ray is not installed, or no cluster answers at `ray_address`."""
