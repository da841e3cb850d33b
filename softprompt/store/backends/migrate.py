"""`softprompt store migrate SRC DST`: copy a store (e.g. a SQLite one) into another (e.g. PostgreSQL
plus s3://), every version of every task with its number, creation time, metrics, tags and sha256,
and the compiled serving forms, and every version's approvals (store/approvals.py: state, who, why,
signature; a signature stays valid, since the bytes it covers are copied unchanged).

Bytes first, rows after, in one write transaction of the destination: a migration killed midway
leaves at most unnamed files (`store gc` removes them), and run again it picks up where it stopped
(a version already there with the same sha256 is skipped; with another sha256 it is refused).
"""

from __future__ import annotations

import hashlib

import torch

from softprompt.store import compiled


def migrate(src, dst) -> dict:
    """Copy `src` (a Store) into `dst` (a Store); counts of what was copied or already there."""
    from softprompt.store import approvals
    from softprompt.store.core import COLUMNS, StoreError

    db = src._db()
    rows = [dict(zip(COLUMNS, r)) for r in db.execute("SELECT * FROM tasks ORDER BY name, version").fetchall()]
    last = dict(db.execute("SELECT name, last_version FROM names").fetchall())
    kv_rows = (db.execute("SELECT sha256, base_fingerprint, dtype, kv_sha256, shape, size, created FROM compiled")
               .fetchall() if compiled._has_table(src) else [])

    def copy(src_path, dst_path, sha, what):
        blob = src._read_blob(src_path)
        if blob is None or hashlib.sha256(blob).hexdigest() != sha:
            raise StoreError(f"{what}: the source file {src_path} is missing or does not match its sha256; run "
                             "`softprompt store verify` on the source and repair it before migrating")
        dst._put(dst_path, blob)

    for sha in sorted({r["sha256"] for r in rows}):
        copy(src.object_path(sha), dst.object_path(sha), sha, f"artifact {sha[:12]}...")
    kv_rows = [r for r in kv_rows if r[0] in {row["sha256"] for row in rows}]
    for sha, fp, dtype, kv_sha, *_ in kv_rows:
        dt = getattr(torch, dtype)
        copy(compiled.compiled_path(src, sha, fp, dt), compiled.compiled_path(dst, sha, fp, dt), kv_sha,
             f"compiled form of {sha[:12]}...")
    if kv_rows:
        compiled._ensure_table(dst)
    decisions = (db.execute(f"SELECT {approvals.COLS} FROM approvals ORDER BY name, version, seq").fetchall()
                 if approvals.has_table(src) else [])
    if decisions:
        approvals.ensure_table(dst)
    copied = skipped = 0
    with dst._write() as out:
        for r in rows:
            have = out.execute("SELECT sha256 FROM tasks WHERE name = ? AND version = ?",
                               (r["name"], r["version"])).fetchone()
            if have is not None:
                if have[0] != r["sha256"]:
                    raise StoreError(f"{r['name']}@{r['version']} is already in {dst.where} with other content; "
                                     "migrate into an empty store, or rm that task there first")
                skipped += 1
                continue
            out.execute("INSERT INTO tasks VALUES (?,?,?,?,?,?,?,?,?,?,?)", tuple(r[c] for c in COLUMNS))
            copied += 1
        for name, v in last.items():  # the "never reuse a version number" memory travels too
            out.execute("INSERT INTO names VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET last_version = "
                        "CASE WHEN excluded.last_version > names.last_version THEN excluded.last_version "
                        "ELSE names.last_version END", (name, v))
        for kv in kv_rows:
            out.execute("INSERT INTO compiled VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING", kv)
        for d in decisions:
            out.execute("INSERT INTO approvals VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING", tuple(d))
        out.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
    return {"versions": copied, "already_there": skipped, "tasks": len(last), "compiled": len(kv_rows)}
