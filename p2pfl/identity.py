"""Node identity: an Ed25519 key that signs, an X25519 key that receives content keys.

The node id is derived from the signing key, so nobody can claim an id without holding its key.
Keys live in the node data dir as raw 32-byte files with mode 0600; their bytes are never logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import nacl.exceptions
import nacl.public
import nacl.signing

from p2pfl.errors import IdentityError

__all__ = [
    "BOX_KEY_FILE",
    "Identity",
    "SIGNING_KEY_FILE",
    "ensure_private_dir",
    "load_or_create",
    "node_id_for",
    "read_private_key",
    "write_private_file",
    "write_public_file",
]

log = logging.getLogger(__name__)

SIGNING_KEY_FILE = "signing.key"
BOX_KEY_FILE = "box.key"
_KEY_BYTES = 32
_DIR_HINT = "set [node] data_dir (or --data-dir) to a directory this user can write"


def node_id_for(verify_key: bytes) -> str:
    """Short, stable node id: 8-byte BLAKE2b of the Ed25519 verify key, as 16 hex chars."""
    return hashlib.blake2b(bytes(verify_key), digest_size=8).hexdigest()


@dataclass(frozen=True, repr=False)
class Identity:
    """The private keys of one node. repr() shows only the node id, never key material."""

    signing_key: nacl.signing.SigningKey
    box_key: nacl.public.PrivateKey

    @cached_property
    def verify_key_bytes(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @cached_property
    def box_public_bytes(self) -> bytes:
        return bytes(self.box_key.public_key)

    @cached_property
    def node_id(self) -> str:
        return node_id_for(self.verify_key_bytes)

    def sign(self, data: bytes) -> bytes:
        """64-byte detached Ed25519 signature over `data`."""
        return self.signing_key.sign(data).signature

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate())

    def __repr__(self) -> str:
        return f"Identity(node_id={self.node_id!r})"

    __str__ = __repr__


def signed_by(verify_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether the Ed25519 key `verify_key` signed `message` (the check for `Identity.sign`); a
    malformed key or signature is a False, never an exception."""
    try:
        nacl.signing.VerifyKey(bytes(verify_key)).verify(message, bytes(signature))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        return False
    return True


def write_private_file(path: Path, data: bytes) -> None:
    """Write `data` atomically to `path` with mode 0600 from the first byte on (no umask window)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)  # in case the file system ignored the mode argument
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def write_public_file(path: Path, data: bytes) -> None:
    """Write public `data` atomically (a torn certificate or list would lock the node out), mode 0644."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_private_dir(directory: Path) -> Path:
    """Create `directory` (mode 0700) if missing; refuse a path that exists but is no directory."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise IdentityError(f"{directory} exists and is not a directory; {_DIR_HINT}")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise IdentityError(
            f"cannot create data dir {directory}: {exc.strerror or exc}; {_DIR_HINT}"
        ) from None
    return directory


def read_private_key(path: Path) -> bytes:
    """Read a raw 32-byte key file; tighten its mode if others could read it."""
    try:
        st = path.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("key file %s was readable by others; setting mode 0600", path)
            os.chmod(path, 0o600)
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if len(data) != _KEY_BYTES:
        raise IdentityError(f"key file {path} is corrupt: expected {_KEY_BYTES} bytes, found {len(data)}")
    return data


def load_or_create(data_dir: Path) -> Identity:
    """Load signing.key / box.key from `data_dir`, or create both (0600) when neither exists."""
    data_dir = ensure_private_dir(Path(data_dir))
    sign_path = data_dir / SIGNING_KEY_FILE
    box_path = data_dir / BOX_KEY_FILE
    have_sign, have_box = sign_path.exists(), box_path.exists()
    if have_sign and have_box:
        seed = read_private_key(sign_path)
        box = read_private_key(box_path)
        try:
            return Identity(nacl.signing.SigningKey(seed), nacl.public.PrivateKey(box))
        except Exception as exc:  # pynacl refuses malformed keys with several exception types
            raise IdentityError(f"key files in {data_dir} are corrupt ({type(exc).__name__})") from None
    if have_sign or have_box:
        missing = BOX_KEY_FILE if have_sign else SIGNING_KEY_FILE
        raise IdentityError(
            f"{data_dir / missing} is missing while its partner key exists; restore it from backup "
            "(a new key would no longer match the node's certificate)"
        )
    identity = Identity.generate()
    try:
        write_private_file(sign_path, bytes(identity.signing_key))
        write_private_file(box_path, bytes(identity.box_key))
    except OSError as exc:  # a read-only dir or a full disk: say where, not a traceback
        raise IdentityError(
            f"cannot write keys into {data_dir}: {exc.strerror or exc}; {_DIR_HINT}"
        ) from None
    log.info("created node identity %s in %s", identity.node_id, data_dir)
    return identity
