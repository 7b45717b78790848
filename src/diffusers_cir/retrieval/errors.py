"""Errors raised by ``diffusers_cir.retrieval``.

Both are ``ValueError`` subclasses so callers that only care about "bad input" can catch one type, while
callers that want to tell "the files are damaged" apart from "the query does not fit this index" can.
"""


class IndexFormatError(ValueError):
    """A saved index folder is missing files, is truncated, or its files disagree with each other."""


class IndexMismatchError(ValueError):
    """Embeddings (or a query model) do not match the embedding width or model an index was built with."""
