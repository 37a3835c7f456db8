"""C2PA content credentials through c2pa-python: a signed manifest in each image and audio file
genserve makes whole, saying it was made by a trained model (IPTC ``trainedAlgorithmicMedia``),
by genserve, with which model, and when.

The signing certificate is the operator's (``GENSERVE_C2PA_CERT``: the chain, leaf first, and
``GENSERVE_C2PA_KEY``, PEM files). Without one, genserve makes a private CA and a signing certificate
issued by it on first start, in ``STATE_DIR/c2pa/`` (c2pa refuses a self-signed leaf). A reader that
is not given that CA sees the credentials as "Valid" (intact, signer not trusted); given it, as
"Trusted". ``/v1/provenance/verify`` trusts the operator's anchors (``GENSERVE_C2PA_TRUST_ANCHORS``)
or the CA it made.

No thumbnail goes into the manifest: it would make a small PNG about 20 times larger.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genserve import __version__

log = logging.getLogger(__name__)

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
# What genserve makes whole and so can sign, by media type. Streamed speech (mp3, wav, opus, aac, pcm
# sent as it is spoken) is not here: a manifest covers a whole file (docs/provenance.md).
EXTENSIONS = {"image/png": "png", "image/gif": "gif", "image/jpeg": "jpg", "image/webp": "webp",
              "audio/wav": "wav", "audio/flac": "flac", "audio/mpeg": "mp3"}
SIGNABLE = frozenset(EXTENSIONS)


class UnreadableFile(ValueError):
    """c2pa could not parse the file as its type (broken, or not what its first bytes say)."""


def _one_pixel_png() -> bytes:
    """The smallest file to sign once at start-up, to find a certificate or key that cannot sign."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, format="PNG")
    return out.getvalue()


@dataclass(frozen=True)
class Credentials:
    chain: bytes  # PEM: the signing certificate, then the ones that issued it
    key: bytes  # PEM: its private key
    anchors: bytes | None  # PEM: the certificates a verification trusts


def load_credentials(cert: Path | None, key: Path | None, anchors: Path | None, state_dir: Path) -> Credentials:
    """The operator's certificate and key, or the private CA's signer (made on first start)."""
    if (cert is None) != (key is None):
        raise ValueError("give both GENSERVE_C2PA_CERT and GENSERVE_C2PA_KEY, or neither")
    trusted = anchors.read_bytes() if anchors is not None else None
    if cert is not None and key is not None:
        return Credentials(cert.read_bytes(), key.read_bytes(), trusted)
    home = state_dir / "c2pa"
    if not (home / "signer.pem").is_file():
        _make_private_ca(home)
    ca = (home / "ca.pem").read_bytes()
    return Credentials((home / "signer.pem").read_bytes(), (home / "signer.key").read_bytes(), trusted or ca)


def _make_private_ca(home: Path) -> None:
    """A P-256 CA (10 years) and a signing certificate it issues (2 years), written in a directory of
    their own that is then renamed to ``home``: servers starting together on one state directory end
    up with one CA, whichever renames first."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    home.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "genserve operator")])

    def usage(sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=not sign,
                             crl_sign=not sign, encipher_only=False, decipher_only=False)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("genserve private CA")).issuer_name(name("genserve private CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(name("genserve content signer")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=730))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    private = lambda k: k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # noqa: E731
                                        serialization.NoEncryption())
    made = Path(tempfile.mkdtemp(prefix=".c2pa.", dir=home.parent))
    # signer.pem holds the signing certificate alone: the chain in a manifest stops below the root, which a
    # verifier has as its trust anchor (ca.pem), and each file is 450 bytes smaller for it.
    for name_, data in (("ca.key", private(ca_key)), ("ca.pem", pem(ca)), ("signer.key", private(key)),
                        ("signer.pem", pem(leaf))):
        fd = os.open(made / name_, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if name_.endswith(".key") else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    try:
        made.rename(home)
    except OSError:  # another server made one first
        shutil.rmtree(made, ignore_errors=True)
        return
    log.warning("made a private CA and a C2PA signing certificate in %s: readers see genserve's content "
                "credentials as valid but untrusted unless given %s; an operator's own certificate goes in "
                "GENSERVE_C2PA_CERT and GENSERVE_C2PA_KEY", home, home / "ca.pem")


@dataclass
class ManifestSummary:
    validation_state: str  # "Invalid", "Valid" (intact, signer not trusted) or "Trusted"
    generator: str | None
    model: str | None
    digital_source_type: str | None
    created: str | None
    issuer: str | None
    problems: list[str]  # c2pa's failure codes, e.g. assertion.dataHash.mismatch
    manifest: dict[str, Any]  # the active manifest as c2pa reports it


class ContentCredentials:
    """Signs and reads C2PA manifests; thread-safe (one lock around c2pa's native calls)."""

    def __init__(self, credentials: Credentials) -> None:
        import c2pa

        self._c2pa = c2pa
        self._credentials = credentials
        self._lock = threading.Lock()  # signing
        self._read_lock = threading.Lock()  # reading: a slow read never holds up signing
        self._sign_context = c2pa.Context(c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
        # No remote manifests: a file's XMP may point at any URL, and reading it must not make this
        # server fetch one (SSRF), nor wait on it.
        trust: dict[str, Any] = {"verify": {"verify_trust": True, "remote_manifest_fetch": False}}
        if credentials.anchors:
            trust["trust"] = {"trust_anchors": credentials.anchors.decode()}
        self._read_context = c2pa.Context(c2pa.Settings.from_dict(trust))
        try:  # a certificate or key that cannot sign stops the start, rather than every image request
            self._signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", credentials.chain, credentials.key,
                                                                     None))
            self.sign(_one_pixel_png(), "image/png", "start-up check")
        except c2pa.C2paError as err:
            raise ValueError(f"the C2PA signing certificate and key cannot sign: {err}") from None

    def sign(self, data: bytes, media_type: str, model: str) -> bytes:
        """``data`` with a manifest saying ``model`` made it now; ``media_type`` must be in ``SIGNABLE``."""
        c2pa = self._c2pa
        manifest = {
            "claim_generator_info": [{"name": "genserve", "version": __version__}],
            "title": f"{model}.{EXTENSIONS[media_type]}",
            "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": [{
                "action": "c2pa.created", "digitalSourceType": TRAINED,
                "softwareAgent": {"name": "genserve", "version": __version__},
                "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "parameters": {"model": model}}]}}]}
        out = io.BytesIO()
        with self._lock, c2pa.Builder(manifest, context=self._sign_context) as builder:
            builder.sign(self._signer, media_type, io.BytesIO(data), out)
        return out.getvalue()

    def read(self, data: bytes, media_type: str) -> ManifestSummary | None:
        """The file's active manifest and its validation, or None when it carries none."""
        c2pa = self._c2pa
        try:
            with self._read_lock, c2pa.Reader(media_type, io.BytesIO(data), context=self._read_context) as reader:
                store = json.loads(reader.json())
        except c2pa.C2paError.ManifestNotFound:
            return None
        except c2pa.C2paError as err:
            raise UnreadableFile(str(err)) from None
        active = store.get("manifests", {}).get(store.get("active_manifest") or "", {})
        actions = [a for assertion in active.get("assertions", []) if assertion.get("label", "").startswith(
            "c2pa.actions") for a in assertion.get("data", {}).get("actions", [])]
        action: dict[str, Any] = next((a for a in actions if a.get("action") == "c2pa.created"), {})
        generator = next((f"{g.get('name')}/{g.get('version')}" for g in active.get("claim_generator_info", [])), None)
        failures = store.get("validation_results", {}).get("activeManifest", {}).get("failure", [])
        return ManifestSummary(
            validation_state=store.get("validation_state", "Invalid"), generator=generator,
            model=(action.get("parameters") or {}).get("model"), digital_source_type=action.get("digitalSourceType"),
            created=action.get("when"), issuer=active.get("signature_info", {}).get("issuer"),
            problems=[f["code"] for f in failures if "code" in f], manifest=active)
