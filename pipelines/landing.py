"""Raw landing zone: every payload exactly as received, so normalization can be
re-run (``redox-elt renormalize``) without calling the API again.

Layout (under the warehouse's landing root)::

    responses/connection=<id>/surface=<fhir|datamodel>/entity=<entity>/<fetched_at>-<pid>-<seq>.json.gz
    responses/.../<same name>.context.json   # how to read the page again (optional)
    documents/sha256/<aa>/<sha256>           # document content, content-addressed
    documents/index.tsv                      # which document URL held which content

``entity`` is the entity the call fetched (what the API was asked for); the page may
feed other entities too (a visit page gives patients and encounters). The context
sidecar holds what the body alone cannot say: the event type the response answers,
the ``Patient`` block of the query a DocumentGet answer belongs to, the entities the
live sync took from the page, and, for a DocumentGet answer, the DocumentQuery answer
whose rows its content completes. It is written before its page, so a page never
appears without it.

Pages landed by earlier versions under ``raw/`` (the folder's old name) are still read.

Every path is built by ``safe_path``, which refuses to leave the landing root, and the
connection / surface / entity segments are checked against the vocabulary: a
connection id like ``../../escape`` cannot write outside the warehouse.
A page is written to a temporary name and renamed, so a killed sync never leaves a
half-written page behind. The page's relative path is the ``raw_ref`` every row carries.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from pipelines.vocabulary import (
    ENTITIES,
    LANDING_DOCUMENTS_DIR,
    LANDING_PAGES_DIR,
    LEGACY_LANDING_PAGES_DIR,
    SURFACES,
    is_plain_connection_id,
)

_SEQ = itertools.count()
_SEQ_LOCK = threading.Lock()
_INDEX_LOCK = threading.Lock()
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
CONTEXT_SUFFIX = ".context.json"
PAGE_SUFFIX = ".json.gz"


class UnsafePath(ValueError):
    """A path segment would leave its root, or is not a value the layout allows."""


def safe_path(root: str | Path, *segments: str) -> Path:
    """``root / segments…``, refusing any result outside ``root`` (``..``, absolute
    segments, symlinks pointing out). Every landing, document and lake path goes through here."""
    base = Path(root).resolve()
    for segment in segments:
        if not segment or "\x00" in segment:
            raise UnsafePath(f"empty or NUL path segment under {base.name}; use plain names")
    target = base.joinpath(*segments).resolve()
    if target != base and base not in target.parents:
        raise UnsafePath(
            f"a path segment leaves its root {base.name}; use plain names (letters, digits, - _)"
        )
    return target


def check_segments(connection_id: str, surface: str, entity: str) -> None:
    """The three partition values of a landed page, each from its vocabulary."""
    if not is_plain_connection_id(connection_id):
        raise UnsafePath(
            f"connection id is not a plain name ({len(str(connection_id))} chars); "
            "use letters, digits, '-' and '_' (at most 64, starting with a letter or digit)"
        )
    if surface not in SURFACES:
        raise UnsafePath(f"surface must be one of {', '.join(SURFACES)}")
    if entity not in ENTITIES:
        raise UnsafePath(f"entity must be one of {', '.join(ENTITIES)}")


# The landing holds PHI: folders and files are the owner's only, whatever the umask.
DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dirs(path: Path) -> None:
    """Create ``path`` and any missing parents owner-only (``mkdir(parents=True)`` would
    give the parents the umask's mode)."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another thread made it
            folder.mkdir(mode=DIR_MODE)
        os.chmod(folder, DIR_MODE)


def _open_private(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_CREAT, FILE_MODE)


def _atomic_write(path: Path, data: bytes) -> None:
    private_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with os.fdopen(_open_private(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class PageContext:
    """What a landed page needs besides its body to be normalized again exactly.

    ``entities`` None: every entity the page feeds is loaded. ``completes``: for a
    Data Model DocumentGet answer, the raw_ref of the DocumentQuery answer whose document
    rows take its content."""

    event_type: str | None = None
    patient: dict[str, Any] | None = None
    entities: tuple[str, ...] | None = None
    completes: str | None = None
    # The patient a per-patient call asked about (panel spelling: "fhir"/"MR"/…, value): the
    # owner of a damaged record on the page that names no patient itself. PHI: landing only.
    pulled_for: tuple[str, str] | None = None

    def is_empty(self) -> bool:
        return self == PageContext()

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {}
        if self.event_type is not None:
            doc["event_type"] = self.event_type
        if self.patient is not None:
            doc["patient"] = self.patient
        if self.entities is not None:
            doc["entities"] = list(self.entities)
        if self.completes is not None:
            doc["completes"] = self.completes
        if self.pulled_for is not None:
            doc["pulled_for"] = list(self.pulled_for)
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, data: bytes) -> PageContext:
        doc = orjson.loads(data)
        entities = doc.get("entities")
        return cls(
            event_type=doc.get("event_type"),
            patient=doc.get("patient"),
            entities=tuple(entities) if entities is not None else None,
            completes=doc.get("completes"),
            pulled_for=tuple(doc["pulled_for"]) if doc.get("pulled_for") else None,
        )


@dataclass(frozen=True)
class LandedPage:
    raw_ref: str  # path relative to the landing root
    connection_id: str
    surface: str
    entity: str
    fetched_at: datetime


class RawLanding:
    """Writes and reads landed pages and content-addressed documents."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, *segments: str) -> Path:
        return safe_path(self.root, *segments)

    def land(
        self,
        connection_id: str,
        surface: str,
        entity: str,
        body: bytes,
        context: PageContext | None = None,
    ) -> LandedPage:
        check_segments(connection_id, surface, entity)
        fetched_at = datetime.now(UTC)
        with _SEQ_LOCK:
            seq = next(_SEQ)
        name = f"{fetched_at.strftime('%Y%m%dT%H%M%S%fZ')}-{os.getpid()}-{seq:06d}{PAGE_SUFFIX}"
        parts = (LANDING_PAGES_DIR, f"connection={connection_id}", f"surface={surface}", f"entity={entity}")
        path = self._path(*parts, name)
        if context is not None and not context.is_empty():
            _atomic_write(path.with_name(name + CONTEXT_SUFFIX), context.to_json())
        # Level 1: landing is on the hot path; gzip -1 is ~5x faster than -9 for ~15% more bytes.
        _atomic_write(path, gzip.compress(body, compresslevel=1, mtime=0))
        rel = "/".join((*parts, name))
        return LandedPage(rel, connection_id, surface, entity, fetched_at)

    def read(self, raw_ref: str) -> bytes:
        return gzip.decompress(self._path(*raw_ref.split("/")).read_bytes())

    def context(self, raw_ref: str) -> PageContext:
        """The page's context sidecar (empty when the page has none)."""
        parts = raw_ref.split("/")
        path = self._path(*parts[:-1], parts[-1] + CONTEXT_SUFFIX)
        return PageContext.from_json(path.read_bytes()) if path.exists() else PageContext()

    def pages(
        self, connection_id: str | None = None, surface: str | None = None, entity: str | None = None
    ) -> Iterator[LandedPage]:
        """Landed pages in the order they were fetched (both the current and the legacy folder)."""
        pattern = "/".join(
            [
                f"connection={connection_id or '*'}",
                f"surface={surface or '*'}",
                f"entity={entity or '*'}",
                f"*{PAGE_SUFFIX}",
            ]
        )
        found = []
        for folder in (LANDING_PAGES_DIR, LEGACY_LANDING_PAGES_DIR):
            base = self.root / folder
            if not base.is_dir():
                continue
            for path in base.glob(pattern):
                parts = {p.split("=", 1)[0]: p.split("=", 1)[1] for p in path.parts if "=" in p}
                stamp = path.name.split("-", 1)[0]
                fetched = datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=UTC)
                rel = path.relative_to(self.root).as_posix()
                found.append(LandedPage(rel, parts["connection"], parts["surface"], parts["entity"], fetched))
        found.sort(key=lambda p: (p.fetched_at, p.raw_ref.rsplit("/", 1)[-1]))
        yield from found

    def store_document(self, content: bytes) -> str:
        """Store document content by its sha256; returns the hex digest."""
        digest = hashlib.sha256(content).hexdigest()
        path = self.document_path(digest)
        if not path.exists():
            _atomic_write(path, content)
        return digest

    def index_content(self, connection_id: str, url: str, digest: str) -> None:
        """Remember which document URL held which content, so renormalization can
        restore content hashes without fetching again. Append-only, one line per fetch."""
        if "\t" in url or "\n" in url:
            return  # cannot be indexed in a TSV line; renormalize will leave the hash unset
        line = f"{connection_id}\t{url}\t{digest}\n".encode()
        path = self._path(LANDING_DOCUMENTS_DIR, "index.tsv")
        private_dirs(path.parent)
        with _INDEX_LOCK, os.fdopen(_open_private(path, os.O_WRONLY | os.O_APPEND), "ab") as fh:
            fh.write(line)

    def content_index(self) -> dict[tuple[str, str], str]:
        path = self._path(LANDING_DOCUMENTS_DIR, "index.tsv")
        out: dict[tuple[str, str], str] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split("\t")
                # A line cut by a kill mid-write is skipped.
                if len(parts) == 3 and _DIGEST.match(parts[2]):
                    out[(parts[0], parts[1])] = parts[2]
        return out

    def document_path(self, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise UnsafePath("a document digest must be 64 lowercase hex characters")
        return self._path(LANDING_DOCUMENTS_DIR, "sha256", digest[:2], digest)
