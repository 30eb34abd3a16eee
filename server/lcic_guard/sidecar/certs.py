"""Server TLS credentials that follow their files.

Certificates are replaced before they expire (cert-manager, a Vault agent,
a Kubernetes secret volume). gRPC asks for the certificate configuration
before each new connection's handshake; :class:`CertificateFiles` answers
with the files as they are now if any of them changed since they were last
loaded (and the new pair is usable), else with "no change". Connections
already open keep the certificate they were set up with.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading

import grpc

log = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int, int], ...]


class CertificateFiles:
    """The server certificate chain, its key and (for mutual TLS) the CA that
    client certificates must chain to, re-read when a file changes."""

    def __init__(self, cert: str, key: str, client_ca: str | None = None) -> None:
        self.cert = cert
        self.key = key
        self.client_ca = client_ca
        self.reloads = 0
        self.failures = 0
        self._lock = threading.Lock()
        self._stamp: Stamp | None = None
        self._bad: Stamp | None = None
        try:
            config = self._read()
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"tls: cannot use certificate {cert} with key {key}: {exc}") from None
        if config is None:
            raise ValueError(f"tls: {cert} or {key} changed while being read; try again")
        self.initial = config

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.cert, self.key, *((self.client_ca,) if self.client_ca else ()))

    def _stamps(self) -> Stamp:
        out = []
        for path in self.paths:
            st = os.stat(path)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def _read(self) -> grpc.ServerCertificateConfiguration | None:
        """The files as they are now (None if they changed while read)."""
        before = self._stamps()
        # Refuse a certificate that does not match its key (e.g. one file
        # replaced and not yet the other): keep serving with the old pair.
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)
        with open(self.cert, "rb") as fh:
            cert = fh.read()
        with open(self.key, "rb") as fh:
            key = fh.read()
        ca = None
        if self.client_ca:
            with open(self.client_ca, "rb") as fh:
                ca = fh.read()
            ssl.create_default_context(cafile=self.client_ca)
        if self._stamps() != before:
            return None
        self._stamp = before
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _load(self) -> grpc.ServerCertificateConfiguration | None:
        """The files as they are now, if they form a usable configuration."""
        try:
            return self._read()
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.failures += 1
            log.warning("tls: cannot load the certificate files (%s); keeping the old ones", exc)
            return None

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate configuration fetcher: None means no change."""
        with self._lock:
            try:
                now = self._stamps()
            except OSError:
                return None
            if now in (self._stamp, self._bad):
                return None
            config = self._load()
            if config is None:
                self._bad = now  # not retried until a file changes again
                return None
            self.reloads += 1
            log.info("tls: reloaded the server certificate from %s", self.cert)
            return config


def reloading_server_credentials(files: CertificateFiles) -> grpc.ServerCredentials:
    """Credentials that use the current files for every new connection."""
    return grpc.dynamic_ssl_server_credentials(
        files.initial,
        files.fetch,
        require_client_authentication=files.client_ca is not None,
    )
