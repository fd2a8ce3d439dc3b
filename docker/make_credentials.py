"""Make the credentials of a TLS + authenticated deployment: a CA, the SuperLink's server
certificate signed by it, and one P-384 key pair per SuperNode (OpenSSH format, as
`flower-supernode --auth-supernode-private-key` and `flwr supernode register` read them).

    python docker/make_credentials.py --out docker/credentials --nodes 3 --host superlink.example.org

Writes OUT/ca.crt, OUT/ca.key, OUT/server.pem, OUT/server.key and OUT/supernode-<i>[.pub].
Copy ca.crt to every SuperNode and to the machine that runs `flwr`; each SuperNode gets only its
own private key; register every .pub with the SuperLink (`flwr supernode register`). The server
certificate is valid for localhost, 127.0.0.1, `superlink` (the compose service) and every --host.
Needs only `cryptography`, which Flower already installs.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pmafl"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_credentials(out: Path, nodes: int, hosts: list[str], days: int = 365) -> None:
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    pem = serialization.Encoding.PEM

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("pmafl CA")).issuer_name(_name("pmafl CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write(out / "ca.crt", ca.public_bytes(pem))
    _write(out / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()), private=True)

    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", "superlink", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0] if hosts else "superlink"))
              .issuer_name(ca.subject).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    _write(out / "server.pem", server.public_bytes(pem))
    _write(out / "server.key", server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()), private=True)

    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        _write(out / f"supernode-{i}", key.private_bytes(pem, serialization.PrivateFormat.OpenSSH,
                                                         serialization.NoEncryption()), private=True)
        _write(out / f"supernode-{i}.pub", key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "credentials")
    parser.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs (default 3)")
    parser.add_argument("--host", action="append", default=[],
                        help="a DNS name or IP the SuperLink is reached at (repeatable)")
    parser.add_argument("--days", type=int, default=365, help="certificate validity (default 365)")
    args = parser.parse_args(argv)
    make_credentials(args.out, args.nodes, args.host, args.days)
    print(f"Credentials in {args.out}: ca.crt, server.pem/.key, supernode-0..{args.nodes - 1}[.pub]")


if __name__ == "__main__":
    main()
