"""Shared test helpers: toy instance images and request builders."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw


class Clock:
    """Time that the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def shape_png(color: str = "red", size: int = 32, offset: int = 0) -> bytes:
    """A filled circle on white, as PNG bytes."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    margin = size // 8 + offset
    draw.ellipse([margin, margin, size - margin, size - margin], fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def random_bundle(
    model: str, root, *, seed: int, token: str | None = None, text_encoder: bool = True
):
    from trainer_service.training.lora import random_lora_bundle

    return random_lora_bundle(model, root, seed=seed, token=token, text_encoder=text_encoder)


def write_model_index(folder: Path, class_name: str = "StableDiffusion3Pipeline") -> Path:
    """A model folder whose index names a pipeline class, and nothing else: by default SD3,
    a family loraforge runs in neither service (a refusal reads nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": class_name, "_diffusers_version": "0.36.0"}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def load_bundles_into(pipe: Any, bundles: dict) -> Any:
    """Stock diffusers with each bundle as an adapter of its name (``load_lora_weights``) and
    its learned tokens in every text encoder of the family (``load_textual_inversion``, the
    vectors stored under each encoder's embedding key)."""
    from loraforge_core import families
    from loraforge_core.bundle import LORA_FILE

    family = families.of_pipeline(pipe)
    places = zip(family.embedding_keys, family.text_encoders, family.tokenizers, strict=True)
    encoders = [(key, getattr(pipe, e), getattr(pipe, t)) for key, e, t in places]
    for name, bundle in bundles.items():
        pipe.load_lora_weights(str(bundle.path / LORA_FILE), adapter_name=name)
        stored, tokens = bundle.embeddings(), bundle.manifest.tokens
        for key, encoder, tokenizer in encoders if tokens else ():
            pipe.load_textual_inversion(
                stored[key], token=tokens, text_encoder=encoder, tokenizer=tokenizer
            )
    return pipe


def _cert(name: str, issuer_key, issuer_name, key, *, ca: bool = False, san: bool = False):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_pki(folder: Path) -> dict[str, Path]:
    """A test CA (ca.pem) and certificates it signed: server.pem/.key (for localhost and
    127.0.0.1) and client.pem/.key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("loraforge-test-ca", ca_key, None, ca_key, ca=True)
    files = {"ca.pem": _pem(ca)}
    for role, san in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{role}.pem"] = _pem(_cert(role, ca_key, ca.subject, key, san=san))
        files[f"{role}.key"] = _pem(key)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}
