"""Resolve a FHIR reference to the resource it points at: contained (``#id``) or bundled.

A Reference names its target three ways: a ``display`` beside it, a ``reference`` to a
resource ``contained`` in the referring one (``#loc1``), or a ``reference`` to another entry
of the same Bundle (``Location/123``, or the entry's absolute ``fullUrl``). Appointments
that point at a contained Location lost their location before this module existed; every
normalizer now reads names, NPIs and codes through ``Refs``. Pure, no I/O: a reference to
a resource that is neither contained nor bundled resolves to None (the caller keeps what
the Reference itself carries).
"""

from __future__ import annotations

from typing import Any

NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"


class Refs:
    """The resources of one Bundle by ``Type/id`` and by ``fullUrl``."""

    def __init__(self, entries: Any = None) -> None:
        self._by_key: dict[str, dict[str, Any]] = {}
        for entry in entries if isinstance(entries, list) else []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict):
                continue
            rtype, rid = resource.get("resourceType"), resource.get("id")
            if isinstance(rtype, str) and isinstance(rid, str) and rid:
                self._by_key.setdefault(f"{rtype}/{rid}", resource)
            full_url = entry.get("fullUrl")
            if isinstance(full_url, str) and full_url:
                self._by_key.setdefault(full_url, resource)

    @classmethod
    def of_bundle(cls, bundle: Any) -> Refs:
        return cls(bundle.get("entry") if isinstance(bundle, dict) else None)

    def resolve(self, holder: dict[str, Any], ref: Any) -> dict[str, Any] | None:
        """The resource ``ref`` (a Reference object) points at, looked up in ``holder``'s
        ``contained`` list first, then in the Bundle; None when it is not at hand."""
        if not isinstance(ref, dict):
            return None
        target = ref.get("reference")
        if not isinstance(target, str) or not target:
            return None
        if target.startswith("#"):
            for contained in holder.get("contained") or []:
                if isinstance(contained, dict) and contained.get("id") == target[1:]:
                    return contained
            return None
        found = self._by_key.get(target)
        if found is None and "/" in target:
            # An absolute URL of a bundled resource: match on its last Type/id.
            tail = "/".join(target.rstrip("/").split("/")[-2:])
            found = self._by_key.get(tail)
        return found


NO_REFS = Refs()


def reference_type(holder: dict[str, Any], ref: Any, refs: Refs) -> str | None:
    """The resource type a Reference points at (from the target, else its ``reference``)."""
    target = refs.resolve(holder, ref)
    if target is not None:
        return target.get("resourceType")
    text = ref.get("reference") if isinstance(ref, dict) else None
    if isinstance(text, str) and "/" in text and not text.startswith("#"):
        return text.rstrip("/").split("/")[-2]
    return ref.get("type") if isinstance(ref, dict) else None


def _name_text(name: Any) -> str | None:
    if isinstance(name, str):
        return name or None
    if isinstance(name, list) and name and isinstance(name[0], dict):
        first = name[0]
        if first.get("text"):
            return first["text"]
        parts = [*(first.get("given") or []), first.get("family")]
        return " ".join(p for p in parts if isinstance(p, str) and p) or None
    return None


def display(holder: dict[str, Any], ref: Any, refs: Refs) -> str | None:
    """A Reference's display, else the name of the resource it points at (Location,
    Organization, Practitioner, Device ...). Used for places and providers, never patients."""
    if not isinstance(ref, dict):
        return None
    if ref.get("display"):
        return ref["display"]
    target = refs.resolve(holder, ref)
    if target is None or target.get("resourceType") == "Patient":
        return None
    return _name_text(target.get("name")) or _name_text(target.get("deviceName"))


def npi(holder: dict[str, Any], ref: Any, refs: Refs) -> str | None:
    """A provider Reference's NPI: its own ``identifier``, else the NPI (or first identifier)
    of the Practitioner it points at."""
    if not isinstance(ref, dict):
        return None
    own = ref.get("identifier") or {}
    if isinstance(own, dict) and own.get("value"):
        return str(own["value"])
    target = refs.resolve(holder, ref)
    if target is None:
        return None
    if target.get("resourceType") == "PractitionerRole":
        target = refs.resolve(target, target.get("practitioner")) or target
    idents = [i for i in target.get("identifier") or [] if isinstance(i, dict) and i.get("value")]
    chosen = next((i for i in idents if i.get("system") == NPI_SYSTEM), idents[0] if idents else None)
    return str(chosen["value"]) if chosen else None


def provider(holder: dict[str, Any], ref: Any, refs: Refs) -> str | None:
    """A provider as the model stores it: the NPI when there is one, else the display."""
    return npi(holder, ref, refs) or display(holder, ref, refs)
