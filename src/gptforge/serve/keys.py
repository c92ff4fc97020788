"""API keys: a JSON file of salted hashes, never the keys themselves.

A key reads `gf-<id>-<secret>`: the id (8 hex digits) finds its entry without trying every hash, the secret
(32 random bytes, URL-safe) is what proves it. The file stores, per key, its name, id, salt and the
PBKDF2-HMAC-SHA256 of the secret; `keys add` prints the key once. The file is written atomically with mode
0600 and refused when others can read it. A key with 256 random bits needs no slow hash against guessing;
the iterations only make a stolen file a little dearer to use, and a verified key is remembered in memory
so a request costs one dictionary look-up.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gptforge.errors import GptforgeError

FORMAT = "gptforge-keys"
ITERATIONS = 20_000
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
KEY = re.compile(r"^gf-([0-9a-f]{8})-([A-Za-z0-9_-]{20,100})$")


@dataclass
class KeyEntry:
    name: str
    id: str
    salt: str
    hash: str
    created: float
    revoked: float | None = None
    rpm: int | None = None  # requests per minute; None: the server's default
    tpm: int | None = None  # generated tokens per minute; None: the server's default


def _digest(secret: str, salt: str, iterations: int = ITERATIONS) -> str:
    return hashlib.pbkdf2_hmac("sha256", secret.encode(), bytes.fromhex(salt), iterations).hex()


def read_keys(path: str | Path) -> list[KeyEntry]:
    """The entries of a key file; a missing file has none. A file others may read, or not ours, is refused."""
    path = Path(path)
    if not path.exists():
        return []
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise GptforgeError(f"{path}: not a regular file")
    if mode & 0o077:
        raise GptforgeError(f"{path}: readable by others (mode {stat.S_IMODE(mode):o}); run chmod 600 {path}")
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptforgeError(f"{path}: not a gptforge key file ({e})") from None
    if not isinstance(tree, dict) or tree.get("format") != FORMAT or not isinstance(tree.get("keys"), list):
        raise GptforgeError(f"{path}: not a gptforge key file (expected {{\"format\": \"{FORMAT}\", \"keys\": [...]}})")
    entries = []
    for i, item in enumerate(tree["keys"]):
        try:
            entry = KeyEntry(**item)
        except TypeError as e:
            raise GptforgeError(f"{path}: key {i}: {e}") from None
        if not (isinstance(entry.name, str) and NAME.match(entry.name) and isinstance(entry.id, str)
                and isinstance(entry.salt, str) and isinstance(entry.hash, str)):
            raise GptforgeError(f"{path}: key {i} is malformed")
        entries.append(entry)
    return entries


def write_keys(path: str | Path, entries: list[KeyEntry]) -> None:
    """Atomically replace the key file; created with mode 0600 before anything is written into it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "version": 1, "keys": [vars(e) for e in entries]}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def add_key(path: str | Path, name: str, rpm: int | None = None, tpm: int | None = None) -> str:
    """Create a key called `name`, store its hash, and return the key (shown once, never stored)."""
    if not NAME.match(name):
        raise GptforgeError(f"key name {name!r}: use 1-64 letters, digits and _.@- (starting with a letter or digit)")
    for value, flag in ((rpm, "--rpm"), (tpm, "--tpm")):
        if value is not None and value < 1:
            raise GptforgeError(f"{flag} must be at least 1, got {value}")
    entries = read_keys(path)
    if any(e.name == name and e.revoked is None for e in entries):
        raise GptforgeError(f"{path}: a key named {name!r} exists; revoke it first or choose another name")
    taken = {e.id for e in entries}
    key_id = secrets.token_hex(4)
    while key_id in taken:
        key_id = secrets.token_hex(4)
    secret, salt = secrets.token_urlsafe(32), secrets.token_hex(16)
    entries.append(KeyEntry(name, key_id, salt, _digest(secret, salt), time.time(), None, rpm, tpm))
    write_keys(path, entries)
    return f"gf-{key_id}-{secret}"


def revoke_key(path: str | Path, name: str) -> None:
    entries = read_keys(path)
    live = [e for e in entries if e.name == name and e.revoked is None]
    if not live:
        raise GptforgeError(f"{path}: no live key named {name!r}")
    for entry in live:
        entry.revoked = time.time()
    write_keys(path, entries)


class KeyStore:
    """Checks presented keys against a key file, re-read when the file changes (revocations apply at once)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stamp = None
        self._entries: dict[str, KeyEntry] = {}
        self._verified: dict[str, str] = {}  # sha256 of a key already checked -> its id
        self.reload()

    def reload(self) -> None:
        st = self.path.stat() if self.path.exists() else None
        stamp = None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp and self._entries:
            return
        self._entries = {e.id: e for e in read_keys(self.path)}
        self._verified.clear()
        self._stamp = stamp

    def check(self, key: str | None) -> KeyEntry | None:
        """The live entry that `key` belongs to, or None."""
        self.reload()
        if not key:
            return None
        fast = hashlib.sha256(key.encode()).hexdigest()
        key_id = self._verified.get(fast)
        if key_id is None:
            m = KEY.match(key)
            entry = self._entries.get(m.group(1)) if m else None
            if entry is None or not hmac.compare_digest(_digest(m.group(2), entry.salt), entry.hash):
                return None
            key_id = self._verified[fast] = entry.id
        entry = self._entries.get(key_id)
        return entry if entry is not None and entry.revoked is None else None

    def __len__(self) -> int:
        return sum(e.revoked is None for e in self._entries.values())


def run_keys(args) -> int:
    """`gptforge keys add|list|revoke`."""
    if args.action == "add":
        key = add_key(args.file, args.name, args.rpm, args.tpm)
        print(f"key {args.name!r} added to {args.file}; it is shown once, store it now:", file=sys.stderr)
        print(key)
    elif args.action == "revoke":
        revoke_key(args.file, args.name)
        print(f"key {args.name!r} revoked in {args.file}")
    else:
        entries = read_keys(args.file)
        if not entries:
            print(f"{args.file}: no keys")
        for e in entries:
            state = "revoked " + time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.revoked)) if e.revoked else "live"
            limits = f"rpm {e.rpm or 'default'}, tpm {e.tpm or 'default'}"
            print(f"{e.name:24} gf-{e.id}-...  {state:24} {limits}  created "
                  f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(e.created))} UTC")
    return 0
