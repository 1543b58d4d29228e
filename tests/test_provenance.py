"""Provenance evidence, on real files made here: C2PA-signed JPEG and PNG (a throw-away test CA), a manifest
tampered with after signing, AUTOMATIC1111 and ComfyUI PNG text, EXIF Software, XMP DigitalSourceType, and
a file with nothing. Each record is checked through the library function and the CLI."""

from __future__ import annotations

import datetime
import io
import json
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from deepfake.cli import main
from deepfake.provenance import IPTC, ProvenanceError, load_trust, read_provenance

XMP_AI = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
    f'Iptc4xmpExt:DigitalSourceType="{IPTC}trainedAlgorithmicMedia"/></rdf:RDF></x:xmpmeta>'
)


def image(fmt: str, size=(64, 48), **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buf, format=fmt, **save)
    return buf.getvalue()


def test_ca():
    """A CA and an ES256 end-entity certificate with the extensions the C2PA library requires."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "deepfake tests"),
            ]
        )

    def usage(**on) -> x509.KeyUsage:
        flags = dict.fromkeys(
            ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
            False,
        )  # fmt: skip
        return x509.KeyUsage(**{**flags, **on})

    now = datetime.datetime.now(datetime.UTC)
    ca_key, ee_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def cert(subject, issuer, key, signing_key, ca: bool):
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True, key_cert_sign=ca, crl_sign=ca), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False)
        )
        if not ca:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        return b.sign(signing_key, hashes.SHA256())

    ca = cert(name("deepfake test root"), name("deepfake test root"), ca_key, ca_key, True)
    ee = cert(name("Test Generator Signer"), ca.subject, ee_key, ca_key, False)
    pem = serialization.Encoding.PEM
    key = ee_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), ee.public_bytes(pem) + ca.public_bytes(pem), key


test_ca.__test__ = False  # a helper, not a test


def sign(data: bytes, mime: str, chain: bytes, key: bytes, source_type: str = "trainedAlgorithmicMedia") -> bytes:
    import c2pa

    manifest = {
        "claim_generator_info": [{"name": "TestGen", "version": "1.0"}],
        "title": "generated",
        "format": mime,
        "assertions": [
            {
                "label": "c2pa.actions.v2",
                "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": IPTC + source_type}]},
            }
        ],
    }
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg=b"es256", sign_cert=chain, private_key=key, ta_url=None))
    out = io.BytesIO()
    with c2pa.Builder(manifest) as builder:
        builder.sign(signer, mime, io.BytesIO(data), out)
    return out.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_files(tmp_path_factory.mktemp("provenance"))


def make_files(d: Path) -> dict[str, Path]:
    """Every kind of file of the matrix, written to `d`; {"dir": d, name: path}."""
    ca_pem, chain, key = test_ca()
    (d / "ca.pem").write_bytes(ca_pem)
    signed_jpg = sign(image("JPEG"), "image/jpeg", chain, key)
    out = {
        "signed.jpg": signed_jpg,
        "signed.png": sign(image("PNG"), "image/png", chain, key),
        "capture.jpg": sign(image("JPEG"), "image/jpeg", chain, key, "digitalCapture"),
        "nothing.jpg": image("JPEG"),
        "software.jpg": image("JPEG", exif=_exif_software("Adobe Firefly Image 3")),
        "camera.jpg": image("JPEG", exif=_exif_software("Camera firmware 1.2")),
        "xmp.jpg": image("JPEG", xmp=XMP_AI.encode()),
    }
    # the manifest's bytes changed after signing: the library must say so
    i = signed_jpg.find(b"c2pa.actions")
    tampered = bytearray(signed_jpg)
    tampered[i + 200] ^= 0x55
    out["tampered_manifest.jpg"] = bytes(tampered)
    # the pixels changed after signing: the manifest no longer matches the file
    pixels = bytearray(signed_jpg)
    pixels[-300] ^= 0x55
    out["tampered_pixels.jpg"] = bytes(pixels)
    # the claim (its generator's name) changed after signing: the signature no longer matches it
    out["tampered_claim.jpg"] = signed_jpg.replace(b"TestGen", b"TestGeN", 1)
    a1111, comfy = PngImagePlugin.PngInfo(), PngImagePlugin.PngInfo()
    a1111.add_text(
        "parameters", "a cat in a hat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1"
    )
    comfy.add_text("prompt", json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}))
    comfy.add_text("workflow", json.dumps({"nodes": [{"type": "KSampler"}]}))
    out["a1111.png"] = image("PNG", pnginfo=a1111)
    out["comfyui.png"] = image("PNG", pnginfo=comfy)
    for name, data in out.items():
        (d / name).write_bytes(data)
    return {"dir": d, **{n: d / n for n in out}}


def _exif_software(text: str) -> bytes:
    exif = Image.Exif()
    exif[0x0131] = text
    return exif.tobytes()


EXPECTED = {  # file -> (provenance, c2pa present, c2pa validation_state, metadata signatures)
    "signed.jpg": ("declared_ai", True, "Valid", []),
    "signed.png": ("declared_ai", True, "Valid", []),
    "capture.jpg": ("declared_capture", True, "Valid", []),
    "nothing.jpg": ("none", False, None, []),
    "software.jpg": ("declared_ai", False, None, ["generator_software"]),
    "camera.jpg": ("none", False, None, []),
    "xmp.jpg": ("declared_ai", False, None, ["xmp:trainedAlgorithmicMedia"]),
    "tampered_pixels.jpg": ("declared_ai", True, "Invalid", []),
    "tampered_claim.jpg": ("declared_ai", True, "Invalid", []),
    "a1111.png": ("declared_ai", False, None, ["automatic1111"]),
    "comfyui.png": ("declared_ai", False, None, ["comfyui", "comfyui"]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_record_per_kind_of_file(files, name):
    label, present, state, sigs = EXPECTED[name]
    r = read_provenance(files[name].read_bytes())
    assert r["provenance"] == label, r
    assert r["c2pa"]["present"] is present and r["c2pa"].get("validation_state") == state, r
    assert [m["signature"] for m in r["metadata"]] == sigs
    if present and state:
        c = r["c2pa"]
        assert c["claim_generator"] == ("TestGeN 1.0" if name == "tampered_claim.jpg" else "TestGen 1.0")
        assert c["signer"] == "Test Generator Signer"
        assert c["issuer"] == "deepfake tests" and c["actions"] == ["c2pa.created"]
        # a throw-away CA is not trusted unless the caller says so; the reason says which
        assert "signingCredential.untrusted" in c["validation_codes"]
        assert ("not trusted" if state == "Valid" else "validation Invalid") in r["reason"]
    if name.startswith("tampered_"):
        code = "assertion.dataHash.mismatch" if name == "tampered_pixels.jpg" else "claimSignature.mismatch"
        assert code in r["c2pa"]["validation_codes"] and f"altered after signing: {code}" in r["reason"]
    if name == "a1111.png":
        assert r["metadata"][0]["field"] == "png:parameters" and "Steps: 20" in r["metadata"][0]["excerpt"]


def test_tampered_manifest_is_an_error_in_the_record_not_a_crash(files):
    r = read_provenance(files["tampered_manifest.jpg"].read_bytes())
    assert r["c2pa"]["present"] is True and r["c2pa"]["error"] and r["provenance"] == "none"
    assert "unreadable" in r["reason"]


def test_trust_anchors_make_the_signer_trusted(files):
    trust = load_trust(files["dir"] / "ca.pem")
    r = read_provenance(files["signed.jpg"].read_bytes(), trust)
    assert r["c2pa"]["validation_state"] == "Trusted" and r["c2pa"]["validation_codes"] == []
    assert "trusted signer" in r["reason"]
    with pytest.raises(ProvenanceError, match="no PEM"):
        load_trust(files["nothing.jpg"])


def test_limits_and_non_images():
    r = read_provenance(b"x" * 100, max_bytes=10)
    assert r["provenance"] == "none" and "limit" in r["reason"]
    assert read_provenance(b"not an image at all")["provenance"] == "none"


def test_cli_prints_one_json_line_per_file(files, capsys):
    assert main(["provenance", str(files["dir"]), "--c2pa-trust", str(files["dir"] / "ca.pem")]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    by_name = {Path(x["path"]).name: x for x in lines}
    assert set(by_name) == set(EXPECTED) | {"tampered_manifest.jpg"}
    for name, (label, *_rest) in EXPECTED.items():
        assert by_name[name]["provenance"] == label, by_name[name]
    assert by_name["signed.jpg"]["c2pa"]["validation_state"] == "Trusted"
