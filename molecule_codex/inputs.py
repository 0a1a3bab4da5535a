"""Turn an A2A message into codex ``turn/start`` input items, refusing what must not reach codex.

* text parts are joined with newlines; data parts become JSON text;
* images (raw bytes, a ``data:`` URL, or a file inside the workspace) become ``localImage`` /
  ``image`` items: codex rejects remote image URLs, so we never pass one;
* other files are saved under ``<workspace>/.molecule/inputs/`` and named in the prompt;
* a ``file://`` URL or path that resolves (symlinks included) outside the workspace, and any
  remote URL, is refused with an :class:`InputError` whose text the caller sees.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from a2a.types import Message, Part
from google.protobuf import json_format
from google.protobuf.json_format import MessageToDict

from molecule_codex.reply_usage import whole_numbers

#: Where attachments land inside the workspace (codex can read them there).
INPUTS_DIRNAME = ".molecule/inputs"
#: Filenames we write: keep them short and free of separators and control characters.
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")
MAX_FILENAME_CHARS = 80


class InputError(ValueError):
    """The message cannot become a codex turn; the text is safe to show the caller."""


@dataclass(slots=True)
class CodexInput:
    """What ``turn/start`` gets, plus what we logged about it."""

    items: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""
    saved_files: list[Path] = field(default_factory=list)


def _safe_filename(name: str, fallback: str) -> str:
    base = os.path.basename(name or "") or fallback
    cleaned = _UNSAFE_FILENAME.sub("_", base).strip("._") or fallback
    return cleaned[-MAX_FILENAME_CHARS:]


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def _resolve_local(reference: str, workspace: Path) -> Path:
    """A ``file://`` URL, ``workspace:`` reference or path, resolved and checked to stay inside."""
    if reference.startswith("file://"):
        raw = unquote(urlparse(reference).path)
    elif reference.startswith("workspace:"):
        raw = reference[len("workspace:") :].lstrip("/")
    else:
        raw = reference
    try:
        candidate = Path(raw) if os.path.isabs(raw) else workspace / raw
        resolved = candidate.resolve()
        inside = _inside(resolved, workspace.resolve())
        is_file = inside and resolved.is_file()
    except (OSError, ValueError):  # a NUL byte, a name too long for the filesystem, …
        raise InputError(f"refused file reference {reference!r}: not a usable path") from None
    if not inside:
        raise InputError(f"refused file reference {reference!r}: it points outside the workspace")
    if not is_file:
        raise InputError(f"refused file reference {reference!r}: no such file in the workspace")
    return resolved


def _is_image(media_type: str, name: str) -> bool:
    if media_type.startswith("image/"):
        return True
    return not media_type and name.lower().endswith((".png", ".jpg", ".jpeg", ".gif", ".webp"))


@dataclass(slots=True)
class _Collected:
    """What the parts of one message contribute, before anything is written to disk."""

    texts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    to_save: list[tuple[str, bytes, bool]] = field(default_factory=list)  # (filename, bytes, is_image)


class InputBuilder:
    """Builds codex input for one workspace; files are written only after the message validates."""

    def __init__(self, workspace: Path, max_input_chars: int) -> None:
        self.workspace = Path(workspace)
        self.max_input_chars = max_input_chars

    @staticmethod
    def touches_disk(message: Message) -> bool:
        """Whether building ``message`` decodes or writes attachments or resolves files (blocking
        work for a thread); text and data parts alone are converted in microseconds."""
        return any(part.WhichOneof("content") in ("raw", "url") for part in message.parts)

    def build(self, message: Message) -> CodexInput:
        """Convert ``message``; raise InputError with a caller-readable reason."""
        collected = _Collected()
        for index, part in enumerate(message.parts):
            self._take_part(index, part, collected)
        text = "\n".join(t for t in collected.texts if t)
        if len(text) > self.max_input_chars:
            raise InputError(
                f"the message has {len(text):,} characters of text; the limit is {self.max_input_chars:,}"
            )
        if not text.strip() and not collected.images and not collected.to_save and not collected.notes:
            raise InputError("the message is empty: send text, data, or a file")
        result = CodexInput(text=text)
        notes = list(collected.notes)
        for filename, data, is_image in collected.to_save:
            saved = self._save(filename, data)
            result.saved_files.append(saved)
            if is_image:
                collected.images.append({"type": "localImage", "path": str(saved)})
            else:
                notes.append(f"[attached file saved at {saved}]")
        prompt = "\n".join([text, *notes]).strip()
        if prompt:
            result.items.append({"type": "text", "text": prompt, "text_elements": []})
        result.items.extend(collected.images)
        return result

    def _take_part(self, index: int, part: Part, collected: _Collected) -> None:
        kind = part.WhichOneof("content")
        media_type = part.media_type or ""
        if kind == "text":
            collected.texts.append(part.text)
        elif kind == "data":
            try:
                data = whole_numbers(MessageToDict(part.data))
            except (ValueError, json_format.Error):
                raise InputError(f"part {index}: the data holds NaN or Infinity, which JSON cannot carry") from None
            collected.texts.append(json.dumps(data, ensure_ascii=False, sort_keys=True))
        elif kind == "raw":
            name = _safe_filename(part.filename, f"attachment-{index}")
            collected.to_save.append((name, part.raw, _is_image(media_type, name)))
        elif kind == "url":
            self._take_url(index, part, collected)
        # An empty part carries nothing; an empty message as a whole is refused in build().

    def _take_url(self, index: int, part: Part, collected: _Collected) -> None:
        url = part.url
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            declared = header[5:].split(";")[0]
            if ";base64" not in header:
                raise InputError(f"part {index}: only base64 data: URLs are supported")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise InputError(f"part {index}: the data: URL is not valid base64") from None
            name = _safe_filename(part.filename, f"attachment-{index}")
            collected.to_save.append((name, data, _is_image(declared or part.media_type, name)))
            return
        scheme = urlparse(url).scheme
        if scheme in ("http", "https", "ftp", "s3", "gs"):
            raise InputError(
                f"part {index}: remote URLs are not fetched ({scheme}://…); attach the file's bytes instead"
            )
        path = _resolve_local(url, self.workspace)
        if _is_image(part.media_type, path.name):
            collected.images.append({"type": "localImage", "path": str(path)})
        else:
            collected.notes.append(f"[attached file in the workspace: {path}]")

    def _save(self, filename: str, data: bytes) -> Path:
        directory = self.workspace / INPUTS_DIRNAME
        if not _inside(directory.resolve(), self.workspace.resolve()):  # e.g. a symlink made in the workspace
            raise InputError(f"{INPUTS_DIRNAME} in the workspace points outside it; attachments are not saved there")
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"{uuid.uuid4().hex[:8]}-{filename}"
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return target
