"""The cluster's secrets and certificates, made fresh at every `up`. Files only: never in a
command line (`ps` shows those), a URL, a log line or `status`.

    CLUSTER_DIR/secrets/  (0700, every file 0600)
        app.pgpass            the app role's password, a libpq passfile (the hosts' PGPASSFILE)
        admin.pgpass          PgBouncer's admin console user's, for `deploy.cluster` itself
        pgbouncer-users.txt   PgBouncer's auth_file: SCRAM-SHA-256 secrets, no password
        ca.key, NAME.key      the private keys (pgbouncer, and with --ha each database node's)
        postgres.pgpass       with --ha: the superuser's, for `deploy.cluster` to make the database
        postgres.password     the same alone, for the PostgreSQL exporter (--monitoring)
    CLUSTER_DIR/tls/      ca.crt (what the app, PgBouncer and the nodes verify against), NAME.crt

The app logs in as its own role (APP_ROLE: it reads and writes the tables, nothing more),
never as the superuser that made the schema. Its SCRAM secret is computed by libpq
(psycopg2's `encrypt_password`, the function behind psql's \\password), given to
PostgreSQL as such (`ALTER ROLE ... PASSWORD 'SCRAM-SHA-256$...'`) and written unchanged
into PgBouncer's auth_file: PgBouncer checks the app's proof against it and, where
PostgreSQL asks for SCRAM too, logs in to it with the keys the client's proof gave it.

Certificates are made with `cryptography` (the library pip, OpenSSL's Python users and
certbot rely on) rather than by calling the openssl command with its many flags: an ECDSA
P-256 CA valid for 30 days, and a certificate per server naming every address it is
reached at, which libpq's `sslmode=verify-full` checks.
"""

import datetime
import ipaddress
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from psycopg2 import sql
from psycopg2.extensions import encrypt_password

APP_ROLE = "greenflask_app"
ADMIN_USER = "pgbouncer_admin"  # PgBouncer's admin console only: not a PostgreSQL role
VALID_DAYS = 30


@dataclass(frozen=True)
class Credentials:
    """Where one cluster's secrets and certificates are (paths only: safe to print)."""

    folder: Path  # CLUSTER_DIR

    @property
    def secrets(self) -> Path:
        return self.folder / "secrets"

    @property
    def tls(self) -> Path:
        return self.folder / "tls"

    @property
    def app_passfile(self) -> Path:
        return self.secrets / "app.pgpass"

    @property
    def admin_passfile(self) -> Path:
        return self.secrets / "admin.pgpass"

    @property
    def auth_file(self) -> Path:
        return self.secrets / "pgbouncer-users.txt"

    @property
    def ca_cert(self) -> Path:
        return self.tls / "ca.crt"

    @property
    def superuser_passfile(self) -> Path:
        return self.secrets / "postgres.pgpass"

    @property
    def superuser_password(self) -> Path:
        """The same password alone (prometheus-postgres-exporter's DATA_SOURCE_PASS_FILE)."""
        return self.secrets / "postgres.password"

    @property
    def patroni_env(self) -> Path:
        """With --ha: the three passwords as Patroni reads them (PATRONI_*_PASSWORD=...)."""
        return self.secrets / "patroni.env"

    def cert(self, server: str) -> Path:
        return self.tls / f"{server}.crt"

    def key(self, server: str) -> Path:
        return self.secrets / f"{server}.key"

    def make_folders(self) -> None:
        self.secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.secrets.chmod(0o700)
        self.tls.mkdir(mode=0o755, exist_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.secrets, ignore_errors=True)
        shutil.rmtree(self.tls, ignore_errors=True)


def new_password() -> str:
    """256 random bits, URL-safe (no ':' or '\\', which a passfile would need escaped)."""
    return secrets.token_urlsafe(32)


def write_private(path: Path, text: str, owner: str | None = None) -> None:
    """`text` into `path`, mode 0600 from its first byte (never readable by others, even briefly)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    if owner:
        shutil.chown(path, owner)


def passfile(user: str, password: str) -> str:
    """A libpq passfile line for `user` on any host, port and database."""
    return f"*:*:*:{user}:{password}\n"


def make_app_role(superuser_dsn: str, password: str) -> str:
    """Create (or re-key) APP_ROLE with `password` on the server of `superuser_dsn` and grant
    it the tables and sequences of its database; return its SCRAM secret."""
    connection = psycopg2.connect(superuser_dsn, connect_timeout=10)
    try:
        connection.autocommit = True
        secret = encrypt_password(password, APP_ROLE, connection, "scram-sha-256")
        role = sql.Identifier(APP_ROLE)
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_database(), EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %s)",
                           (APP_ROLE,))
            database, exists = cursor.fetchone()
            verb = sql.SQL("ALTER") if exists else sql.SQL("CREATE")
            cursor.execute(sql.SQL("{} ROLE {} LOGIN PASSWORD %s").format(verb, role), (secret,))
            for grant in ("GRANT CONNECT ON DATABASE {database} TO {role}",
                          "GRANT USAGE ON SCHEMA public TO {role}",
                          "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
                          "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"):
                cursor.execute(sql.SQL(grant).format(database=sql.Identifier(database), role=role))
    finally:
        connection.close()
    return secret


def scram_secret(dsn: str, user: str, password: str) -> str:
    """libpq's SCRAM-SHA-256 secret of `password` for `user`, made on this side (libpq asks
    for a connection to the server `dsn`, any user's; the password is never sent)."""
    connection = psycopg2.connect(dsn, connect_timeout=10)
    try:
        return encrypt_password(password, user, connection, "scram-sha-256")
    finally:
        connection.close()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "greenflask cluster"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key, owner: str | None) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_private(path, pem.decode(), owner)


def make_certificates(credentials: Credentials, servers: dict[str, list[str]], key_owner: str | None) -> None:
    """A new CA, and for each server a certificate naming its addresses (IPs or names),
    signed by the CA; the servers' keys readable by `key_owner` (PgBouncer's and PostgreSQL's
    user) only."""
    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("greenflask cluster CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write_key(credentials.secrets / "ca.key", ca_key, None)
    if key_owner:
        shutil.chown(credentials.secrets, key_owner)  # the servers reach their keys in it
    credentials.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for server, addresses in servers.items():
        key = ec.generate_private_key(ec.SECP256R1())
        names = [_subject_alternative_name(address) for address in addresses]
        certificate = (x509.CertificateBuilder().subject_name(_name(server)).issuer_name(ca_name)
                       .public_key(key.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(now).not_valid_after(until)
                       .add_extension(x509.SubjectAlternativeName(names), critical=False)
                       .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                       .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                                      critical=False)
                       .sign(ca_key, hashes.SHA256()))
        _write_key(credentials.key(server), key, key_owner)
        credentials.cert(server).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _subject_alternative_name(address: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(address))
    except ValueError:
        return x509.DNSName(address)
