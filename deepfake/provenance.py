"""Provenance evidence from a file's own bytes: C2PA manifests and generator metadata.

A pixel classifier is one kind of evidence; a statement of origin is another, and the two are reported side
by side, never merged. This module reads, from the original bytes and before any decoding or resizing:
- C2PA (Content Credentials), through the Content Authenticity Initiative's `c2pa-python`: the active
  manifest's claim generator, the `digitalSourceType` of its actions (`trainedAlgorithmicMedia` is how
  OpenAI, Adobe Firefly, Microsoft and Google mark generated output), the signer and issuer, and the
  validation state as the library reports it (`Trusted`, `Valid`, `Invalid`; with codes such as
  `signingCredential.untrusted` or `assertion.dataHash.mismatch`). Remote manifests are not fetched unless the
  caller asks (`remote=True`, `deepfake provenance --c2pa-remote`) and no OCSP request is made: by default,
  reading a file touches no network. Trust anchors come only from the caller.
- Metadata that generators write (Pillow, no decoding of pixels): PNG text chunks (AUTOMATIC1111's
  `parameters`, ComfyUI's `prompt` and `workflow`, NovelAI's `Software`/`Comment`), EXIF `Software`, and
  the IPTC/XMP `DigitalSourceType` field.

The overall `provenance` is one of `declared_ai`, `declared_capture`, `edited`, `none`, with the reason.
Reading rule for a user (README "Provenance"): a valid AI declaration outranks a "real" pixel verdict; a
capture declaration does not outrank an "ai" pixel verdict; the signer's trust is shown, never assumed.
"""

from __future__ import annotations

import io
import json
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
AI_SOURCE_TYPES = {
    "trainedAlgorithmicMedia",
    "compositeWithTrainedAlgorithmicMedia",
    "algorithmicMedia",
    "compositeSynthetic",
}
CAPTURE_SOURCE_TYPES = {"digitalCapture", "negativeFilm", "positiveFilm", "print", "computationalCapture"}
EDIT_ACTIONS = {
    "c2pa.edited",
    "c2pa.color_adjustments",
    "c2pa.cropped",
    "c2pa.drawing",
    "c2pa.filtered",
    "c2pa.resized",
    "c2pa.orientation",
    "c2pa.transcoded",
    "c2pa.placed",
    "c2pa.removed",
}
# EXIF Software / PNG Software values that name an image generator (case-insensitive substrings)
GENERATOR_SOFTWARE = (
    "stable diffusion",
    "automatic1111",
    "comfyui",
    "novelai",
    "midjourney",
    "dall-e",
    "dall·e",
    "firefly",
    "imagen",
    "invokeai",
    "fooocus",
    "leonardo.ai",
)
MAX_BYTES = 64 * 2**20  # the same order as the server's body limit: larger files are not parsed
EXCERPT = 120
_XMP_SOURCE = re.compile(rb"DigitalSourceType(?:>|=\")\s*([^<\"\s]+)")
MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "TIFF": "image/tiff", "GIF": "image/gif"}


class ProvenanceError(ValueError):
    """A setting that cannot be used (an unreadable trust file); never raised for a file's own content."""


def _excerpt(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT else text[: EXCERPT - 1] + "…"


def _source_name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------- C2PA
@lru_cache(maxsize=8)
def _context(trust_pem: str | None, remote: bool = False):
    import c2pa

    settings: dict[str, Any] = {"verify": {"remote_manifest_fetch": bool(remote), "ocsp_fetch": False}}
    if trust_pem:
        settings["trust"] = {"trust_anchors": trust_pem}
    return c2pa.Context(c2pa.Settings.from_dict(settings))


def load_trust(path: str | Path | None) -> str | None:
    """The PEM text of a trust-anchor file (`--c2pa-trust`), checked to hold at least one certificate."""
    if not path:
        return None
    p = Path(path).expanduser()
    try:
        text = p.read_bytes().decode("utf-8", "replace")
    except OSError as e:
        raise ProvenanceError(f"C2PA trust file {p}: {e.strerror or e}") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ProvenanceError(f"C2PA trust file {p}: no PEM certificate in it")
    return text


def read_c2pa(data: bytes, mime: str | None, trust_pem: str | None = None, remote: bool = False) -> dict[str, Any]:
    """The C2PA part of the record: {present, claim_generator, digital_source_types, actions, signer, issuer,
    validation_state, validation_codes, error}. A malformed manifest gives `error`, never an exception."""
    import c2pa

    out: dict[str, Any] = {"present": False}
    if mime is None:
        return out
    try:
        reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, _context(trust_pem, remote))
    except Exception as e:  # noqa: BLE001 - the library raises its own error types for bad manifests
        if b"c2pa" in data or b"jumb" in data:
            return {"present": True, "error": f"{type(e).__name__.lstrip('_')}: {str(e)[:200]}"}
        return out  # not parseable by the library and no manifest bytes: nothing to report
    if reader is None:
        return out
    with reader:
        doc = json.loads(reader.json())
    manifest = (doc.get("manifests") or {}).get(doc.get("active_manifest") or "", {})
    actions, sources = [], []
    for a in manifest.get("assertions") or []:
        if str(a.get("label", "")).startswith("c2pa.actions"):
            for act in (a.get("data") or {}).get("actions") or []:
                actions.append(act.get("action"))
                if act.get("digitalSourceType"):
                    sources.append(_source_name(act["digitalSourceType"]))
    gen = manifest.get("claim_generator_info") or []
    generator = ", ".join(f"{g.get('name')} {g.get('version', '')}".strip() for g in gen if g.get("name"))
    sig = manifest.get("signature_info") or {}
    codes = [s.get("code") for s in doc.get("validation_status") or []]
    out.update(
        {
            "present": True,
            "claim_generator": generator or manifest.get("claim_generator"),
            "digital_source_types": sources,
            "actions": actions,
            "signer": sig.get("common_name"),
            "issuer": sig.get("issuer"),
            "validation_state": doc.get("validation_state"),
            "validation_codes": codes,
        }
    )
    return out


# ---------------------------------------------------------------------------------------------- metadata
def read_metadata(img: Image.Image) -> list[dict[str, str]]:
    """Generator signatures in an opened (not decoded) image's metadata: [{signature, field, excerpt}]."""
    found: list[dict[str, str]] = []
    info = img.info or {}

    def add(signature: str, field: str, value: Any) -> None:
        found.append({"signature": signature, "field": field, "excerpt": _excerpt(value)})

    if isinstance(info.get("parameters"), str) and "Steps:" in info["parameters"]:
        add("automatic1111", "png:parameters", info["parameters"])
    for key in ("prompt", "workflow"):
        if isinstance(info.get(key), str) and info[key].lstrip().startswith("{"):
            add("comfyui", f"png:{key}", info[key])
    software = info.get("Software")
    if isinstance(software, str) and "novelai" in software.lower():
        add("novelai", "png:Software", software)
        if isinstance(info.get("Comment"), str):
            add("novelai", "png:Comment", info["Comment"])
    try:
        exif_software = img.getexif().get(0x0131)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no evidence either way
        exif_software = None
    if isinstance(exif_software, bytes):
        exif_software = exif_software.decode("utf-8", "replace")
    if isinstance(exif_software, str):
        low = exif_software.lower()
        if any(g in low for g in GENERATOR_SOFTWARE):
            add("generator_software", "exif:Software", exif_software)
    xmp = info.get("xmp") or info.get("XML:com.adobe.xmp") or b""
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", "replace")
    for m in _XMP_SOURCE.finditer(xmp):
        add(
            f"xmp:{_source_name(m.group(1).decode('utf-8', 'replace'))}",
            "xmp:Iptc4xmpExt:DigitalSourceType",
            m.group(1).decode(),
        )
    return found


# ---------------------------------------------------------------------------------------------- the record
def read_provenance(
    data: bytes, trust_pem: str | None = None, max_bytes: int = MAX_BYTES, remote: bool = False
) -> dict[str, Any]:
    """The provenance record of one file's bytes: {provenance, reason, c2pa, metadata, format}. `remote=True`
    lets the C2PA library fetch a manifest the file only points to (network access; off by default)."""
    if len(data) > max_bytes:
        return {
            "provenance": "none",
            "reason": f"not read: {len(data)} bytes is over the {max_bytes}-byte limit",
            "c2pa": {"present": False},
            "metadata": [],
            "format": None,
        }
    fmt, metadata = None, []
    try:
        with Image.open(io.BytesIO(data)) as img:  # header and metadata only: no pixel is decoded
            fmt = img.format
            metadata = read_metadata(img)
    except Exception:  # noqa: BLE001 - not an image Pillow opens: C2PA may still read it; the decoder reports it
        pass
    c2pa_part = read_c2pa(data, MIME.get(fmt or ""), trust_pem, remote)
    label, reason = summarise(c2pa_part, metadata)
    return {"provenance": label, "reason": reason, "c2pa": c2pa_part, "metadata": metadata, "format": fmt}


def summarise(c2pa_part: dict[str, Any], metadata: list[dict[str, str]]) -> tuple[str, str]:
    """The overall reading: declared_ai, declared_capture, edited or none, with the reason in words."""
    sources = set(c2pa_part.get("digital_source_types") or [])
    state = c2pa_part.get("validation_state")
    trust = (
        "trusted signer"
        if state == "Trusted"
        else ("signature valid, signer not trusted here" if state == "Valid" else f"validation {state or 'failed'}")
    )
    codes = c2pa_part.get("validation_codes") or []
    if c2pa_part.get("error"):
        return "none", f"a C2PA manifest is present but unreadable ({c2pa_part['error']})"
    if sources & AI_SOURCE_TYPES:
        kind = ", ".join(sorted(sources & AI_SOURCE_TYPES))
        mismatches = [c for c in codes if "mismatch" in c]
        tampered = f" (altered after signing: {', '.join(mismatches)})" if mismatches else ""
        return (
            "declared_ai",
            f"C2PA manifest by {c2pa_part.get('claim_generator') or 'an unnamed generator'} declares {kind}; {trust}{tampered}",
        )
    ai_meta = [
        m
        for m in metadata
        if not m["signature"].startswith("xmp:") or _source_name(m["signature"][4:]) in AI_SOURCE_TYPES
    ]
    if ai_meta:
        m = ai_meta[0]
        return (
            "declared_ai",
            f"generator metadata ({m['signature']} in {m['field']}); unsigned, easily added or removed",
        )
    if sources & CAPTURE_SOURCE_TYPES:
        return (
            "declared_capture",
            f"C2PA manifest declares {', '.join(sorted(sources & CAPTURE_SOURCE_TYPES))}; {trust}",
        )
    if any(m["signature"][4:] in CAPTURE_SOURCE_TYPES for m in metadata if m["signature"].startswith("xmp:")):
        return "declared_capture", "XMP DigitalSourceType declares a capture; unsigned"
    if c2pa_part.get("present") and set(c2pa_part.get("actions") or []) & EDIT_ACTIONS:
        return (
            "edited",
            f"C2PA manifest records edits ({', '.join(sorted(set(c2pa_part['actions']) & EDIT_ACTIONS))}); {trust}",
        )
    if c2pa_part.get("present"):
        return "none", f"C2PA manifest without a source declaration; {trust}"
    return "none", "no provenance information in the file"
