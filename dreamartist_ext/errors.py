"""The exceptions DreamArtist raises on purpose.

``InvalidInput`` and its subclasses mean "the user asked for something we cannot do": the CLI prints the message
as one line, the API answers 400 and a job ends "failed: <message>". Any other exception is a bug and keeps its
traceback. ``InvalidInput`` is also a ValueError so that older ``except ValueError`` callers keep working.
"""

from __future__ import annotations


class DreamArtistError(Exception):
    """Base of every exception DreamArtist raises deliberately."""


class InvalidInput(DreamArtistError, ValueError):
    """Bad user input (options, names, images, paths, files on disk); the message is one sentence for the user."""


class TrainingError(InvalidInput):
    """A run that cannot start or cannot go on because of what it was asked to do; the message says what to do."""
