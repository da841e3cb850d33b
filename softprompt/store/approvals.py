"""Who allowed a task version to serve: each version's state (draft, approved, revoked), with who,
when and why, optionally signed with an Ed25519 key over the artifact's checksums.

    approvals(name, version, seq, state, by_name, note, time_ms, sha256, key_id, signature)

The table is a log: every `approve`/`revoke` appends a row (seq 1, 2, ...) and a version's state is
its last row's; a version with no row is a draft (so a store made before approvals existed reads
as all drafts, with no migration step: the table is created on the first approval).

Signing. An approval names bytes, not a name: the signed payload is the canonical JSON (sorted
keys, no spaces, ASCII) of the artifact file's sha256, its tensors' sha256, its card's sha256 (of the
card's canonical JSON), `name@version`, the state, who, why and when. A server started with
`--trust-key PUB.pem` serves a version only if its approval is signed by one of those keys and the
checksums, recomputed from the artifact as stored now, are the signed ones: an artifact swapped
after approval (file and index row both rewritten) or an approval row edited by hand fails.
Keys are `cryptography`'s Ed25519; nothing here is hand-written crypto.

What signing does not stop: someone who can write the index may delete the rows after a signed
approval (a revocation, say) so that an older signed approval is current again. Keep the index's
write access as narrow as the signing key's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path

STATES = ("draft", "approved", "revoked")
MAX_BY_CHARS = 128
MAX_NOTE_CHARS = 4096
PAYLOAD_FORMAT = "softprompt-approval/1"

SCHEMA = """CREATE TABLE IF NOT EXISTS approvals (
    name TEXT NOT NULL, version INTEGER NOT NULL, seq INTEGER NOT NULL, state TEXT NOT NULL,
    by_name TEXT NOT NULL, note TEXT NOT NULL, time_ms BIGINT NOT NULL, sha256 TEXT NOT NULL,
    key_id TEXT, signature TEXT, PRIMARY KEY (name, version, seq))"""
ROW = ("name", "version", "seq", "state", "by", "note", "time_ms", "sha256", "key_id", "signature")


class ApprovalError(ValueError):
    """An approval cannot be made or a key cannot be used; the message says why (one line)."""


def has_table(store) -> bool:
    # only a found table is remembered: another process may create it at any time
    if not getattr(store, "_approvals_table", False):
        store._approvals_table = store._index.has_table("approvals")
    return store._approvals_table


def ensure_table(store) -> None:
    if not has_table(store):
        with store._write() as db:
            db.execute(SCHEMA)  # one statement: executescript would commit the open transaction
        store._approvals_table = True


def check_text(by: str, note: str) -> None:
    """Who: one line of printable text, up to MAX_BY_CHARS; why: up to MAX_NOTE_CHARS, no NUL."""
    if not isinstance(by, str) or not by.strip() or len(by) > MAX_BY_CHARS or not by.isprintable():
        raise ApprovalError(f"--by must name who decides: 1 to {MAX_BY_CHARS} printable characters on one line")
    if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS or "\0" in note:
        raise ApprovalError(f"--note must be text of at most {MAX_NOTE_CHARS} characters")


# --- checksums and the signed payload ------------------------------------------------------------
def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def checksums(blob: bytes) -> dict:
    """The artifact file's, its tensors' and its card's sha256 (the card as canonical JSON)."""
    import struct

    from softprompt.io.artifact import META_KEY, data_section

    (n,) = struct.unpack("<Q", blob[:8])
    card = json.loads(json.loads(blob[8:8 + n])["__metadata__"][META_KEY])
    return {"artifact_sha256": hashlib.sha256(blob).hexdigest(),
            "tensor_sha256": hashlib.sha256(data_section(blob)).hexdigest(),
            "card_sha256": hashlib.sha256(canonical(card)).hexdigest()}


def payload(row: dict, sums: dict) -> bytes:
    """What a signature covers: the approval row's decision and the artifact's checksums."""
    return canonical({"format": PAYLOAD_FORMAT, "task": f"{row['name']}@{row['version']}", "state": row["state"],
                      "by": row["by"], "note": row["note"], "time_ms": row["time_ms"], **sums})


# --- keys --------------------------------------------------------------------------------------
def key_id(public_key) -> str:
    """A public key's short fingerprint (sha256 of its raw 32 bytes, 16 hex digits)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def keygen(out: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new Ed25519 private key to OUT (PEM, PKCS#8, readable by its owner only) and its public
    key to OUT.pub; neither may exist already."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    priv_path = Path(out)
    pub_path = priv_path.with_name(priv_path.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists() or p.is_symlink():
            raise ApprovalError(f"{p} already exists; not overwriting a key (choose another path)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never world-readable, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def _read_key(path, private: bool):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

    what = "private" if private else "public"
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ApprovalError(f"cannot read the {what} key {path}: {e.strerror or e}") from None
    if len(data) > 64 << 10:
        raise ApprovalError(f"{path} is not an Ed25519 {what} key (over 64 KiB)")
    try:
        key = load_pem_private_key(data, password=None) if private else load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ApprovalError(f"{path} is not a PEM Ed25519 {what} key ({str(e).splitlines()[0] if str(e) else e}); "
                            "make one with `softprompt store keygen OUT`") from None
    if not isinstance(key, Ed25519PrivateKey if private else Ed25519PublicKey):
        raise ApprovalError(f"{path} is a {type(key).__name__}, not an Ed25519 {what} key")
    return key


def load_private(path):
    return _read_key(path, private=True)


def load_trusted(paths) -> dict:
    """key_id -> public key, for each PEM file in `paths`."""
    keys = {}
    for p in paths or ():
        k = _read_key(p, private=False)
        keys[key_id(k)] = k
    return keys


def sign(row: dict, blob: bytes, private_key) -> dict:
    """The row with its key id and signature (base64) over `payload(row, checksums(blob))`."""
    sig = private_key.sign(payload(row, checksums(blob)))
    return dict(row, key_id=key_id(private_key.public_key()), signature=base64.b64encode(sig).decode())


def signature_problem(row: dict, blob: bytes, trusted: dict) -> str | None:
    """Why `row` (an approval) does not prove that `blob` was approved by a trusted key; None if it does."""
    from cryptography.exceptions import InvalidSignature

    if not row.get("signature"):
        return "its approval is not signed (approve it again with --key KEYFILE)"
    key = trusted.get(row.get("key_id"))
    if key is None:
        return f"its approval is signed by key {row.get('key_id')}, which this server does not trust (--trust-key)"
    try:
        sig = base64.b64decode(row["signature"], validate=True)
        key.verify(sig, payload(row, checksums(blob)))
    except (InvalidSignature, ValueError):
        return ("its signed approval does not match the artifact as stored now (the artifact or the approval was "
                "changed after signing)")
    return None


# --- reading and writing rows ------------------------------------------------------------------
def _as_dict(r) -> dict:
    d = dict(zip(ROW, r))
    d["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d["time_ms"] / 1000))
    d["signed"] = bool(d["signature"])
    return d


def current(store, name: str, version: int) -> dict | None:
    """The last approval row of name@version (None: a draft). One indexed read."""
    if not has_table(store):
        return None
    r = store._db().execute(f"SELECT {COLS} FROM approvals WHERE name = ? AND version = ? ORDER BY seq DESC LIMIT 1",
                            (name, version)).fetchone()
    return _as_dict(r) if r else None


def log(store, name: str, version: int | None = None) -> list[dict]:
    """Every approval row of a task (or one version), oldest first."""
    if not has_table(store):
        return []
    where, args = ("name = ? AND version = ?", (name, version)) if version else ("name = ?", (name,))
    rows = store._db().execute(f"SELECT {COLS} FROM approvals WHERE {where} ORDER BY version, seq", args).fetchall()
    return [_as_dict(r) for r in rows]


def states(store) -> dict:
    """(name, version) -> state, for every version with an approval row (others are drafts)."""
    if not has_table(store):
        return {}
    q = ("SELECT name, version, state FROM approvals a WHERE seq = "
         "(SELECT max(seq) FROM approvals b WHERE b.name = a.name AND b.version = a.version)")
    return {(n, v): s for n, v, s in store._db().execute(q).fetchall()}


def latest_approved(store, name: str) -> int | None:
    """The highest version of `name` whose state is approved (None: none is); one indexed read."""
    if not has_table(store):
        return None
    q = ("SELECT max(version) FROM approvals a WHERE name = ? AND state = 'approved' AND seq = "
         "(SELECT max(seq) FROM approvals b WHERE b.name = a.name AND b.version = a.version)")
    return store._db().execute(q, (name,)).fetchone()[0]


def append(store, entry, state: str, by: str, note: str, private_key=None) -> dict:
    """Record `state` for a store entry (a StoreEntry: its file is checked against the index first),
    signed with `private_key` if given; the new current row."""
    check_text(by, note)
    entry.verify()  # an approval names the bytes the index names, never a damaged file
    blob = entry.path.read_bytes()
    if state == "approved":  # approving what cannot load would be approving a refusal at serving time
        from softprompt.store import checks

        checks.check_loads(checks.card_in(blob, str(entry.path)), blob, f"task {entry.name}@{entry.version}")
    ensure_table(store)
    with store._write() as db:
        now = db.execute("SELECT sha256 FROM tasks WHERE name = ? AND version = ?",
                         (entry.name, entry.version)).fetchone()
        if now is None or now[0] != entry.sha256:  # removed (or replaced) since it was read: decide nothing
            raise ApprovalError(f"task {entry.name}@{entry.version} changed in the store while deciding; try again")
        (seq,) = db.execute("SELECT coalesce(max(seq), 0) + 1 FROM approvals WHERE name = ? AND version = ?",
                            (entry.name, entry.version)).fetchone()
        row = {"name": entry.name, "version": entry.version, "seq": seq, "state": state, "by": by, "note": note,
               "time_ms": int(time.time() * 1000), "sha256": entry.sha256, "key_id": None, "signature": None}
        if private_key is not None:
            row = sign(row, blob, private_key)
        db.execute("INSERT INTO approvals VALUES (?,?,?,?,?,?,?,?,?,?)", tuple(row[k] for k in ROW))
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")  # servers see the change
    return _as_dict(tuple(row[k] for k in ROW))


COLS = "name, version, seq, state, by_name, note, time_ms, sha256, key_id, signature"
