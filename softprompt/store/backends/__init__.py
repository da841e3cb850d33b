"""Where a prompt store keeps its index and its bytes (softprompt/store/core.py is the one user).

    index (rows: tasks, versions, checksums)   sqlite.SQLiteIndex (a file, the default) or
                                               postgres.PostgresIndex (a shared server, many machines)
    bytes (content-addressed files)            blobs.LocalBlobs (a directory) or
                                               blobs.FsspecBlobs (any fsspec URL: s3://, gs://, ...)

The store's logic (versions, atomic publish, tamper detection, gc) is written once, in store.py and
compiled.py, against the small surface these classes share: `conn()`, `write()`, `has_table()`;
`put()`, `local()`, `remove()`, `list()`. See docs/distributed.md for running many servers on one.
"""

from softprompt.store.backends.blobs import FsspecBlobs, LocalBlobs
from softprompt.store.backends.sqlite import SQLiteIndex


def is_database_url(root) -> bool:
    return isinstance(root, str) and root.startswith(("postgresql://", "postgres://"))
