"""The credential vault: secrets sealed under the KEK file, stored as opaque rows.

Values are sealed with `tether.crypto.sealing` (AES-256-GCM, a fresh DEK per
version, the DEK wrapped under the active KEK) inside the store transaction
that assigns the version, so the version bound into the AEAD is the row's.
Only sealed bytes reach the database; no API returns a value to an operator;
nothing here logs or formats a value.

KEK rotation (`tether secrets rotate-kek --kek-file F --db DB`) is an offline
tool that may run while the control plane serves: it appends a new active KEK
to the file (old ones stay), then re-wraps every stored DEK under it in ONE
transaction. A running control plane notices the changed KEK file (its mtime,
size and inode are checked before every seal and open) and reloads it, so new
secrets are sealed under the new KEK and re-wrapped rows open without a
restart. Remove an old KEK from the file only after a rotate-kek run reported
that nothing was left under it (run it again: it prints the count).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tether.core.errors import ConfigError, NotFound, PreconditionFailed
from tether.crypto import sealing
from tether.store.base import SealedSecret as StoredSecret
from tether.store.base import Store

log = logging.getLogger("tether.control.vault")

MAX_SECRET_BYTES = 64 * 1024


class VaultNotConfigured(PreconditionFailed):
    """The control plane was started without --kek-file, so it cannot seal or open."""

    reason = "VAULT_NOT_CONFIGURED"


def _to_row(sealed: sealing.SealedSecret, now_ms: int) -> StoredSecret:
    # nonce is kept inside wrapped_dek and ciphertext (nonce || AES-GCM output).
    return StoredSecret(
        name=sealed.name,
        version=sealed.version,
        kek_id=sealed.kek_id,
        wrapped_dek=sealed.wrapped_dek,
        nonce=b"",
        ciphertext=sealed.ciphertext,
        created_unix_ms=now_ms,
    )


def _from_row(row: StoredSecret) -> sealing.SealedSecret:
    return sealing.SealedSecret(
        name=row.name,
        version=row.version,
        kek_id=row.kek_id,
        wrapped_dek=row.wrapped_dek,
        ciphertext=row.ciphertext,
    )


@dataclass(frozen=True)
class _Stamp:
    mtime_ns: int
    size: int
    ino: int


def _stamp(path: Path) -> _Stamp:
    st = path.stat()
    return _Stamp(st.st_mtime_ns, st.st_size, st.st_ino)


class Vault:
    """Seals and opens secrets with the KEKs of one file, reloading it when it changes."""

    def __init__(self, kek_file: Path | str) -> None:
        """Loads the KEK file.

        Raises:
            ConfigError: the file is missing, too open (not 0600) or malformed.
        """
        self.kek_file = Path(kek_file)
        self._sealer = sealing.sealer_from_file(self.kek_file)
        try:
            self._stamp = _stamp(self.kek_file)
        except OSError as err:  # pragma: no cover - just loaded it
            raise ConfigError(f"KEK file {self.kek_file}: {err.strerror}") from None

    @property
    def active_kek(self) -> str:
        """Id of the KEK new secrets are sealed under."""
        return self._current().active

    def _current(self, *, force: bool = False) -> sealing.Sealer:
        """The sealer, reloaded first when the KEK file changed (or `force`)."""
        try:
            stamp = _stamp(self.kek_file)
        except OSError:
            log.warning("KEK file %s is unreadable; keeping the keys loaded", self.kek_file)
            return self._sealer
        if force or stamp != self._stamp:
            try:
                self._sealer = sealing.sealer_from_file(self.kek_file)
            except ConfigError as err:
                # Keep serving with the keys we have (a rotation may be half-written;
                # the next call retries). The message names no key material.
                log.warning("KEK file reload failed, keeping the keys loaded: %s", err.message)
            else:
                self._stamp = stamp
                log.info("KEK file reloaded; active KEK %s", self._sealer.active)
        return self._sealer

    async def put(self, store: Store, name: str, value: bytes, now_ms: int) -> int:
        """Seals `value` as the next version of `name`; returns that version."""
        sealer = self._current()
        return await store.put_sealed_secret(
            name, lambda version: _to_row(sealer.seal(name, version, value), now_ms)
        )

    async def open(self, store: Store, name: str) -> bytes:
        """The latest version of secret `name`.

        Raises:
            NotFound: no secret is stored under `name`.
            ConfigError: its KEK is in no version of the KEK file.
            VerificationError: the stored blob fails authentication.
        """
        row = await store.get_secret(name)
        if row is None:
            raise NotFound(f"no secret is stored for credential {name!r}", metadata={"name": name})
        sealed = _from_row(row)
        sealer = self._current()
        if sealed.kek_id not in sealer.kek_ids:
            sealer = self._current(force=True)  # rotated under us: the file has the new KEK
        return sealer.open(sealed)


def init_kek_file(path: Path | str) -> str:
    """Creates a KEK file (mode 0600, never overwritten); returns the KEK id."""
    return sealing.generate_kek_file(path)


async def rotate_kek(kek_file: Path | str, store: Store) -> tuple[str, int]:
    """Adds a new active KEK to `kek_file` and re-wraps every stored DEK under it.

    The file is changed first (old KEKs stay), then every row is re-wrapped in
    one transaction; if any row fails (its KEK is missing or it was tampered
    with), no row changes and the error names the secret, never its value.
    Running again re-wraps whatever a running control plane sealed meanwhile.

    Returns:
        (new active KEK id, rows re-wrapped).
    """
    new_id = sealing.add_kek(kek_file)
    sealer = sealing.sealer_from_file(kek_file)
    if sealer.active != new_id:  # pragma: no cover - add_kek appends the active key
        raise ConfigError(f"KEK file {kek_file}: the new KEK is not the active one")

    def rewrap(row: StoredSecret) -> StoredSecret | None:
        sealed = _from_row(row)
        if not sealer.needs_rewrap(sealed):
            return None
        return _to_row(sealer.rewrap(sealed), row.created_unix_ms)

    count = await store.rewrap_secrets(rewrap)
    log.info("re-wrapped %d secret version(s) under KEK %s", count, new_id)
    return new_id, count


def check_secret_value(value: bytes) -> None:
    """Raises ValueError (with no secret in it) when a value is empty or too large."""
    if not value:
        raise ValueError("the secret value is empty")
    if len(value) > MAX_SECRET_BYTES:
        raise ValueError(f"the secret value is {len(value)} bytes; the limit is {MAX_SECRET_BYTES}")
