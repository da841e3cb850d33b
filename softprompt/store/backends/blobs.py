"""Content-addressed files of a store: a local directory, or any fsspec filesystem (s3://...).

Keys are relative paths ("objects/ab/<sha256>.safetensors", "compiled/..."); a key's bytes never
change (its name is their hash), except that a damaged file is replaced by the right bytes.
Every reader works on a local file: LocalBlobs *is* the local directory; FsspecBlobs keeps a local
copy of each key it has read (a read-through cache: safe because names are content hashes, and
every copy is checked against the index's sha256 before it is used, as a local file is).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from softprompt.core.atomic import write_file


def write_atomic(path: Path, blob: bytes, tmp_dir: Path, durable: bool = True) -> None:
    """Write `path` whole or not at all (softprompt/core/atomic.py); with `durable`, the rename itself is
    on disk before the index row that names the file."""
    write_file(path, blob, tmp_dir, durable)


class LocalBlobs:
    """Files under `root` (a local or network directory): the store's own layout, as ever."""

    remote = False

    def __init__(self, root: Path):
        self.root = Path(root)

    def url(self, key: str) -> str:
        return str(self.root / key)

    def put(self, key: str, blob: bytes) -> None:
        write_atomic(self.root / key, blob, self.root / "tmp")

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def remove(self, key: str) -> bool:
        p = self.root / key
        if p.exists():
            p.unlink()
            return True
        return False

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        return [str(p.relative_to(self.root)) for p in base.rglob("*.safetensors")] if base.is_dir() else []


class FsspecBlobs:
    """Files under an fsspec URL. An object store's PUT is atomic (the object appears whole or not at
    all), which is all a publish needs: no temp file, no rename. Credentials and endpoint come from
    the filesystem's usual environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_ENDPOINT_URL for a non-AWS server)."""

    remote = True

    def __init__(self, url: str):
        import fsspec

        self.base_url = url.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.base_url)
        self.base = self.base.rstrip("/")

    def url(self, key: str) -> str:
        return f"{self.base_url}/{key}"

    def put(self, key: str, blob: bytes) -> None:
        self.fs.pipe_file(f"{self.base}/{key}", blob)

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(f"{self.base}/{key}")

    def remove(self, key: str) -> bool:
        try:
            self.fs.rm_file(f"{self.base}/{key}")
            return True
        except FileNotFoundError:
            return False

    def list(self, prefix: str) -> list[str]:
        self.fs.invalidate_cache()  # another machine may have written since our last listing
        try:
            found = self.fs.find(f"{self.base}/{prefix}")
        except FileNotFoundError:
            return []
        return [p[len(self.base) + 1:] for p in found if p.endswith(".safetensors")]

    def fetch(self, key: str, dest: Path, sha: str | None, tmp_dir: Path) -> bool:
        """Copy `key` to the local file `dest` if its bytes hash to `sha`; False (nothing written) if
        they do not; FileNotFoundError if there is no such key."""
        blob = self.read(key)
        if sha is not None and hashlib.sha256(blob).hexdigest() != sha:
            return False
        write_atomic(dest, blob, tmp_dir, durable=False)  # a cache: a lost copy is fetched again
        return True
